"""dare (Yu et al. 2024): drop each entry of tau_i with probability p, rescale the rest by 1/(1-p), then the
weighted mean, times lambda. PEFT's `dare_linear` (weights 1/n). mergekit 0.1.5's `dare_linear` draws the same
mask but rescales the kept entries to the task vector's L1 norm rather than by 1/(1-p), and sums rather than
averages: only PEFT's DARE is the paper's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


@register("dare", mergekit="dare_linear", options=("drop_rate", "lambda", "seed"),
          summary="DARE: drop each task vector's entries at random and rescale, then average")
def dare(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import drop_and_rescale, scale, weighted_mean

    return scale(weighted_mean([drop_and_rescale(t, opts.drop_rate, generator) for t in taus], weights), opts.lam)
