"""ties (Yadav et al. 2023): trim each tau_i to its top `density` fraction by magnitude (per tensor), elect each
entry's sign by the summed weighted mass sign(sum_i w_i tau_i), and take the weighted mean over the models that
agree with it (disjoint mean), times lambda. mergekit's `ties` (normalize: true) and PEFT's `ties`; the one choice
of our own: entries tied exactly with the k-th largest magnitude are all kept, where their sorts keep an arbitrary
subset."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


@register("ties", mergekit="ties", options=("density", "lambda"),
          summary="TIES: trim each task vector, elect signs, merge the agreeing entries")
def ties(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import elect_and_mean, scale, trim_by_magnitude

    return scale(elect_and_mean([trim_by_magnitude(t, opts.density) for t in taus], weights), opts.lam)
