"""task-average: lambda * sum_i w_i tau_i / sum_i w_i (task arithmetic with the weights normalised)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


def coefficients(weights: list[float], opts: MergeOptions) -> list[float]:
    return [opts.lam * w / sum(weights) for w in weights]


@register("task-average", options=("lambda",), summary="the average of the contributions' task vectors, scaled by "
          "lambda", coefficients=coefficients)
def task_average(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import scale, weighted_mean

    return scale(weighted_mean(taus, weights), opts.lam)
