"""ties-dare: DARE's drop and rescale, then TIES' sign election and disjoint mean, times lambda (PEFT's
`dare_ties`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


@register("ties-dare", mergekit="dare_ties", options=("drop_rate", "lambda", "seed"),
          summary="DARE's random drop and rescale, then TIES")
def ties_dare(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import drop_and_rescale, elect_and_mean, scale

    return scale(elect_and_mean([drop_and_rescale(t, opts.drop_rate, generator) for t in taus], weights), opts.lam)
