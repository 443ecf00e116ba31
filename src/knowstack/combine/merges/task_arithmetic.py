"""task-arithmetic: lambda * sum_i w_i tau_i, unnormalised (Ilharco et al. 2023; mergekit's `task_arithmetic`,
whose weights default to 1 here: the plain sum of the task vectors, times lambda)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


def coefficients(weights: list[float], opts: MergeOptions) -> list[float]:
    return [opts.lam * w for w in weights]


@register("task-arithmetic", mergekit="task_arithmetic", options=("lambda",),
          summary="the sum of the contributions' task vectors (times their "
          "weights), scaled by lambda", coefficients=coefficients)
def task_arithmetic(taus: list[Tensor], weights: Tensor, opts: MergeOptions,
                    generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import scale, weighted_sum

    return scale(weighted_sum(taus, weights), opts.lam)
