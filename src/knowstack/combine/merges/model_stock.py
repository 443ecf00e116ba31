"""model-stock (Jang et al. 2024, Model Stock): with cos theta the mean over pairs of the cosine between the task
vectors (per tensor) and N their number, t = N cos theta / (1 + (N - 1) cos theta), and the merged task vector is t
times the task vectors' mean: the base moved a fraction t towards the models' average (mergekit's `model_stock`,
filter_wise false; where 1 + (N - 1) cos theta is 0 it keeps the base, as mergekit does). It needs at least two
models and reads no per-model weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


def interpolation_ratio(cos_theta: float, n: int) -> float:
    """Model Stock's t for n task vectors at mean pairwise cosine cos_theta (0 where it is singular)."""
    denominator = 1 + (n - 1) * cos_theta
    return 0.0 if abs(denominator) < 1e-6 else n * cos_theta / denominator


@register("model-stock", mergekit="model_stock", options=(), weighted=False, models=(2, None),
          summary="Model Stock: the models' average, moved towards the base by the angle between task vectors")
def model_stock(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    from knowstack.combine.merges.blocks import gram, weighted_mean

    products = gram(taus).tolist()
    norms = [products[i][i] ** 0.5 for i in range(len(taus))]
    cosines = [max(-1.0, min(1.0, products[i][j] / max(norms[i] * norms[j], 1e-6)))
               for i in range(len(taus)) for j in range(i + 1, len(taus))]
    t = interpolation_ratio(sum(cosines) / len(cosines), len(taus))
    return weighted_mean(taus, weights).mul_(t)
