"""regmean: RegMean (Jin et al., ICLR 2023, "Dataless knowledge fusion by merging weights of language models"). For
a linear layer's weight W_i (out x in) of each model and the Gram matrix G_i = X_i^T X_i / n_i of the layer's inputs
on that model's own data (combine/statistics.py), the merged weight minimizes sum_i w_i ||X_i W^T - X_i W_i^T||^2 /
n_i:

    W* = (sum_i w_i W_i G_i) (sum_i w_i G_i)^-1,

after each G_i's off-diagonal entries are multiplied by alpha (`regmean_alpha`: 1 is the exact least-squares
merge; the paper's alpha < 1 pulls it toward the per-feature, diagonal, weighting; FusionBench's GPT-2 default is
0.6). Every other tensor (embeddings, norms, biases: no Gram) is the plain weighted average, as in the paper. On
LoRA adapters W_i = W_0 + s B_i A_i with the Gram of the module's input on the adapted model, which gives W_0 plus
a merged delta. It has no mergekit equivalent; tests/test_statistics_merges.py checks it against
torch.linalg.lstsq on the stacked inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges.base import MergeOptions, declare, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


# FusionBench's RegMean for GPT-2 (config/method/regmean/gpt2_regmean.yaml: reduce_non_diagonal_ratio 0.6)
declare("regmean_alpha", float, 0.6, "regmean: factor on the off-diagonal entries of each Gram matrix (1: the exact "
        "least-squares merge)", ge=0, le=1)


def reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """alpha G + (1 - alpha) diag(G) (in place): the off-diagonal entries scaled by alpha, the diagonal kept."""
    diagonal = gram.diagonal().clone()
    gram.mul_(alpha)
    gram.diagonal().copy_(diagonal)
    return gram


@register("regmean", options=("regmean_alpha",), uses_base=False, statistics="gram",
          summary="RegMean: each linear layer's least-squares merge on the contributors' input Gram matrices")
def regmean(tensors: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None,
            grams: list[Tensor]) -> Tensor:
    import torch

    w = weights.tolist()
    lhs = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros(grams[0].shape[0], tensors[0].shape[0], dtype=torch.float64)
    for tensor, gram, weight in zip(tensors, grams, w, strict=True):
        gram = reduce_off_diagonal(gram.double(), opts.regmean_alpha)
        lhs.add_(gram, alpha=weight)
        rhs.add_(gram @ tensor.double().T, alpha=weight)
    # W*^T = (sum w G)^-1 (sum w G W^T); a singular sum (an input feature no model's data ever sets) is solved
    # in the least-squares sense instead, which leaves that feature's column at zero
    try:
        merged = torch.linalg.solve(lhs, rhs)
    except RuntimeError:
        merged = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
    return merged.T.to(tensors[0].dtype).contiguous()
