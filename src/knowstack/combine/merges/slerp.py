"""slerp: spherical linear interpolation of two models' full weights, tensor by tensor: with theta the angle
between x_0 and x_1, sin((1-t) theta)/sin(theta) x_0 + sin(t theta)/sin(theta) x_1 (t = 0 gives the first model,
1 the second), and the plain (1-t) x_0 + t x_1 where the two are nearly colinear (|cos theta| > 0.9995): mergekit's
`slerp` with the first model as its base_model. mergekit requires t; knowstack's default is the midpoint (declared below). On LoRA
adapters the full weights are the base's plus each adapter's delta. It reads no per-model weights."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, declare, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# mergekit requires t; knowstack's default is the midpoint
declare("t", float, 0.5, "slerp: the position between the two models", ge=0, le=1, sweepable=True)

COLINEAR = 0.9995  # mergekit's threshold on |cos theta| past which it interpolates linearly
EPS = 1e-8  # a norm below this is taken as 1 (a zero tensor), as in mergekit


def slerp_coefficients(t: float, cos_theta: float) -> tuple[float, float]:
    """(c_0, c_1) with slerp(x_0, x_1) = c_0 x_0 + c_1 x_1, for the cosine of the angle between them."""
    cos_theta = min(1.0, max(-1.0, cos_theta))
    if abs(cos_theta) > COLINEAR:
        return 1.0 - t, t
    theta = math.acos(cos_theta)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


@register("slerp", mergekit="slerp", options=("t",), uses_base=False, weighted=False, models=(2, 2),
          summary="SLERP: the spherical interpolation of two models, at t", changes_first_only=True)
def slerp(tensors: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import dot, norm

    first, second = tensors
    norms = [n if n > EPS else 1.0 for n in (norm(first), norm(second))]
    c_first, c_second = slerp_coefficients(opts.t, dot(first, second) / (norms[0] * norms[1]))
    return first.mul_(c_first).add_(second, alpha=c_second)
