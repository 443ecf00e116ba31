"""fisher: Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging models with Fisher-weighted averaging"): per
entry, theta* = sum_i w_i (F_i + floor) theta_i / sum_i w_i (F_i + floor), with F_i the diagonal empirical Fisher of
model i on its own data (combine/statistics.py: the mean squared gradient of the answer's log-likelihood) and floor
(`fisher_floor`, FusionBench's minimal_fisher_weight 1e-6) keeping entries no model's data moves a plain average.
Equal Fishers give the weighted average. Unlike FusionBench's default (normalize_fisher_weight) each model's Fisher
is not rescaled by its norm: the paper's definition. On LoRA adapters theta_i = W_0 + s B_i A_i and F_i is the
Fisher of that effective weight, which gives W_0 plus a merged delta. No mergekit equivalent; tested against the
formula written out in tests/test_statistics_merges.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, declare, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


# FusionBench's Fisher merging (fisher_merging.yaml: minimal_fisher_weight 1e-6)
declare("fisher_floor", float, 1e-6, "fisher: added to every Fisher entry", gt=0)


@register("fisher", options=("fisher_floor",), uses_base=False, statistics="fisher",
          summary="Fisher merging: each entry weighted by the contributors' diagonal Fisher on their own data")
def fisher(tensors: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None,
           fishers: list[Tensor]) -> Tensor:
    import torch

    numerator = torch.zeros_like(tensors[0], dtype=torch.float64)
    denominator = torch.zeros_like(tensors[0], dtype=torch.float64)
    for tensor, information, weight in zip(tensors, fishers, weights.tolist(), strict=True):
        weighted = information.double().add_(opts.fisher_floor).mul_(weight)
        numerator.add_(weighted * tensor.double())
        denominator.add_(weighted)
    return numerator.div_(denominator).to(tensors[0].dtype)
