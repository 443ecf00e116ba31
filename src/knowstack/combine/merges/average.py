"""average: sum_i w_i theta_i / sum_i w_i, of the full weights (mergekit's `linear`, normalize: true). It needs no
base; on LoRA deltas it is the same thing, as the mean is linear."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


def coefficients(weights: list[float], opts: MergeOptions) -> list[float]:
    return [w / sum(weights) for w in weights]


@register("average", mergekit="linear", options=(),
          summary="the plain average of the contributions (models and/or adapters)",
          uses_base=False, coefficients=coefficients, changes_first_only=True)
def average(tensors: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import weighted_mean

    return weighted_mean(tensors, weights)
