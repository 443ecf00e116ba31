"""della (Deep et al. 2024, DELLA-Merging): MagPrune drops each entry of tau_i at random, the entries of larger
magnitude (ranked within their row) kept more often, with probabilities from density - epsilon to density +
epsilon; the kept entries are scaled so that tau_i keeps its L1 norm; then TIES' sign election and the weighted
mean of the agreeing entries, times lambda: mergekit's `della` (normalize and rescale true)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, declare, register
from knowstack.errors import KnowstackError

if TYPE_CHECKING:
    import torch
    from torch import Tensor


# mergekit's default
declare("epsilon", float, 0.15, "della: keep probabilities spread over density +- epsilon", ge=0, lt=0.5,
        sweepable=True)


def check(opts: MergeOptions) -> None:
    """The keep probabilities density +- epsilon must lie in (0, 1), as mergekit requires."""
    if opts.density < 1 and not (opts.density - opts.epsilon > 0 and opts.density + opts.epsilon < 1):
        raise KnowstackError(f"DELLA keeps entries with probabilities density +- epsilon, which must lie in (0, 1): "
                             f"density {opts.density}, epsilon {opts.epsilon}", field="epsilon")


@register("della", mergekit="della", options=("density", "epsilon", "lambda", "seed"), check=check,
          summary="DELLA: drop entries at random, the smaller more often, then TIES' election and mean")
def della(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import della_drop, elect_and_mean, scale

    dropped = [della_drop(t, opts.density, opts.epsilon, generator) for t in taus]
    return scale(elect_and_mean(dropped, weights), opts.lam)
