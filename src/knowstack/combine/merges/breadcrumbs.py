"""breadcrumbs (Davari & Belilovsky 2023, Model Breadcrumbs): in each tau_i drop the largest-magnitude `gamma`
fraction (outliers) and the smallest, so that a `density` fraction remains (blocks.keep_magnitude_band), then
lambda * sum_i w_i tau_i, unnormalised: mergekit's `breadcrumbs`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, declare, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


declare("gamma", float, 0.01, "breadcrumbs: fraction of the largest-magnitude entries dropped", ge=0, lt=1,
        sweepable=True)


@register("breadcrumbs", mergekit="breadcrumbs", options=("density", "gamma", "lambda"),
          summary="Model Breadcrumbs: drop each task vector's largest and smallest entries, then sum")
def breadcrumbs(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import keep_magnitude_band, scale, weighted_sum

    return scale(weighted_sum([keep_magnitude_band(t, opts.density, opts.gamma) for t in taus], weights), opts.lam)
