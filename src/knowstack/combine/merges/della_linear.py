"""della-linear: DELLA's MagPrune drop and L1 rescale, then lambda * sum_i w_i tau_i, unnormalised: mergekit's
`della_linear`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, register
from knowstack.combine.merges.della import check

if TYPE_CHECKING:
    import torch
    from torch import Tensor


@register("della-linear", mergekit="della_linear", options=("density", "epsilon", "lambda", "seed"),
          check=check,
          summary="DELLA's magnitude-ranked random drop, then the sum of the task vectors")
def della_linear(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import della_drop, scale, weighted_sum

    return scale(weighted_sum([della_drop(t, opts.density, opts.epsilon, generator) for t in taus], weights), opts.lam)
