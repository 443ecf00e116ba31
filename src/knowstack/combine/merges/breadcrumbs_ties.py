"""breadcrumbs-ties: breadcrumbs' magnitude band, then TIES' sign election, and the weighted sum (not the mean)
of the agreeing entries, times lambda: mergekit's `breadcrumbs_ties` (whose normalize defaults to false)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


@register("breadcrumbs-ties", mergekit="breadcrumbs_ties", options=("density", "gamma", "lambda"),
          summary="Model Breadcrumbs' drop, then TIES' sign election (the agreeing entries summed)")
def breadcrumbs_ties(taus: list[Tensor], weights: Tensor, opts: MergeOptions,
                     generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import elect_and_mean, keep_magnitude_band, scale

    banded = [keep_magnitude_band(t, opts.density, opts.gamma) for t in taus]
    return scale(elect_and_mean(banded, weights, normalize=False), opts.lam)
