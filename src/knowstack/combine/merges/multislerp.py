"""multislerp: barycentric interpolation of several task vectors on the sphere (mergekit's `multislerp` with a
base_model): with u_i = tau_i / (|tau_i| + 1e-8) and w_i the weights normalised to sum 1, the weighted mean of the
u_i projected back onto the unit sphere, times the weighted mean norm sum_i w_i |tau_i|. (mergekit first maps the
u_i to the tangent space at that mean direction, averages there and maps back; the weighted mean of those tangent
vectors is zero by construction, so its exponential map returns the mean direction itself, up to rounding.)
Two task vectors whose weighted unit vectors cancel are averaged linearly, as in mergekit; more than two that
cancel are an error there and here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, register
from knowstack.errors import KnowstackError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

EPS = 1e-8


@register("multislerp", mergekit="multislerp", options=(),
          summary="Multi-SLERP: the weighted spherical mean of the task vectors")
def multislerp(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import norm

    if len(taus) == 1:
        return taus[0]
    w = (weights / weights.sum()).tolist()
    norms = [norm(tau) for tau in taus]
    units = [tau.div_(n + EPS) for tau, n in zip(taus, norms, strict=True)]
    mean = units[0] * w[0]
    for unit, weight in zip(units[1:], w[1:], strict=True):
        mean.add_(unit, alpha=weight)
    length = norm(mean)
    if length < EPS:
        if not any(norms):
            return mean  # every task vector is zero here: so is their mean
        if len(units) == 2:  # mergekit's fallback for two that cancel: the linear mean of the task vectors
            return units[0].mul_(w[0] * (norms[0] + EPS)).add_(units[1], alpha=w[1] * (norms[1] + EPS))
        raise KnowstackError("multislerp: the weighted unit task vectors cancel out (antipodal task vectors with "
                             "balancing weights); give other weights", field="weights")
    return mean.mul_(sum(wi * ni for wi, ni in zip(w, norms, strict=True)) / length)
