"""karcher: the Karcher (Riemannian) mean of the models' full weights on the unit sphere, times their weighted
mean norm (mergekit's `karcher`): start from the normalised weighted mean of the unit vectors u_i, then up to
max_iter times step along T = sum_i w_i theta_i / sin(theta_i) (u_i - cos(theta_i) u) (theta_i the angle from u to
u_i; angles below tol skipped) by the exponential map, until |T| < tol. Inputs with norm <= tol take no part in
the direction. mergekit weighs the models equally; knowstack uses the weights normalised to sum 1 (equal by
default, which is mergekit's). On LoRA adapters the full weights are the base's plus each adapter's delta."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, declare, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


declare("max_iter", int, 10, "karcher: iterations", gt=0)
declare("tol", float, 1e-5, "karcher: convergence tolerance", gt=0)


@register("karcher", mergekit="karcher", options=("max_iter", "tol"), uses_base=False,
          summary="Karcher mean: the models' weighted mean on the sphere, by iteration")
def karcher(tensors: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    import torch

    from knowstack.combine.merges.blocks import dot, norm

    if len(tensors) == 1:
        return tensors[0]
    alphas = (weights / weights.sum()).tolist()
    norms = [norm(x) for x in tensors]
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    valid = [i for i, n in enumerate(norms) if n > opts.tol]
    if not valid:
        return tensors[0].zero_()
    total = sum(alphas[i] for i in valid)
    parts = [(alphas[i] / total, tensors[i].div_(norms[i])) for i in valid]  # (weight, unit vector)
    u = torch.zeros_like(parts[0][1])
    for a, unit in parts:
        u.add_(unit, alpha=a)
    length = norm(u)
    u = parts[0][1].clone() if length < opts.tol else u.div_(length)
    for _ in range(opts.max_iter):
        step = torch.zeros_like(u)
        for a, unit in parts:
            cos_theta = min(1.0, max(-1.0, dot(u, unit)))
            theta = math.acos(cos_theta)
            if theta < opts.tol:
                continue
            factor = a * theta / math.sin(theta)
            step.add_(unit, alpha=factor).add_(u, alpha=-factor * cos_theta)
        step_norm = norm(step)
        if step_norm < opts.tol:
            break
        u = u.mul_(math.cos(step_norm)).add_(step, alpha=math.sin(step_norm) / step_norm)
        length = norm(u)
        if length > opts.tol:
            u.div_(length)
    return u.mul_(scale)
