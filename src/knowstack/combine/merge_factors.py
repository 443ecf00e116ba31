"""LoRA adapters merged in factor space, as PEFT's `add_weighted_adapter` does it (the paper's LoRA TIES and
DARE-TIES: RhuiDih/cl, model_merge_seq_ties.py, weights 1.0 each, density 0.2).

The default (`lora_space: delta`, merges/) merges each adapter's delta tau_i = s_i B_i A_i. PEFT instead
merges the A matrices among themselves and the B matrices among themselves, and the merged adapter is B' A' at
scale 1. For adapter i with weight w_i and scale s_i (alpha / r), c_i = w_i s_i, and each factor is weighted by
sqrt(|c_i|) (A carries the sign of c_i):

- linear:       X' = sum_i sqrt(c_i) X_i
- ties:         trim each X_i to its top `density` entries by magnitude; elect each entry's sign from the sum of the
                trimmed, unweighted X_i; X' = sum over the agreeing i of sqrt(c_i) X_i, divided by how many agree
- dare_linear:  each X_i's entries dropped with probability p and the rest scaled by 1/(1-p); then as linear
- dare_ties:    DARE's drop and rescale, then TIES' election and disjoint sum

for X = A and X = B, in that order (A of every adapter, then B of every adapter: the order of PEFT's random draws).
knowstack's methods map onto these: ties -> ties, ties-dare -> dare_ties (PEFT's density is 1 - drop_rate), dare ->
dare_linear, and average / task-average -> linear with the weights normalised to sum 1 (an average of factors).
Weights are PEFT's (absolute; 1 each by default, as the paper's) for ties, dare and ties-dare; lambda scales the
merged delta (B'). The product B'A' is not the TIES of the deltas (products of trimmed or averaged factors carry
cross terms), which is why `delta` is the default; this space exists to reproduce the paper's numbers.
tests/test_merge_factors.py checks every method against PEFT's add_weighted_adapter as the oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from knowstack.combine.merges import MergeOptions
from knowstack.combine.merges.blocks import drop_and_rescale, trim_by_magnitude
from knowstack.errors import KnowstackError

LORA_SPACES = ("delta", "factors")
FactorFn = Callable[[list[Tensor], list[float], MergeOptions, "torch.Generator | None"], Tensor]


@dataclass(frozen=True)
class FactorMethod:
    name: str  # knowstack's method name
    peft_name: str  # PEFT's combination_type
    fn: FactorFn
    normalised: bool  # weights normalised to sum 1 (the averages)
    random: bool


FACTOR_METHODS: dict[str, FactorMethod] = {}


def register(name: str, peft_name: str, *, normalised: bool = False, random: bool = False) -> Callable[[FactorFn], FactorFn]:
    def wrap(fn: FactorFn) -> FactorFn:
        FACTOR_METHODS[name] = FactorMethod(name, peft_name, fn, normalised, random)
        return fn

    return wrap


def get_factor_method(name: str) -> FactorMethod:
    if name not in FACTOR_METHODS:
        raise KnowstackError(f"'{name}' has no factor-space form; choose from {', '.join(FACTOR_METHODS)}",
                             field="method")
    return FACTOR_METHODS[name]


def _weighted_sum(factors: list[Tensor], coefs: list[float]) -> Tensor:
    out = factors[0] * coefs[0]
    for factor, coef in zip(factors[1:], coefs[1:], strict=True):
        out.add_(factor, alpha=coef)
    return out


def _elect_and_disjoint_sum(factors: list[Tensor], coefs: list[float]) -> Tensor:
    """PEFT's TIES step: the sign elected from the unweighted sum, the weighted sum over the agreeing factors
    divided by how many agree (a zero entry agrees with neither sign)."""
    total = factors[0].clone()
    for factor in factors[1:]:
        total.add_(factor)
    positive = total >= 0  # a sum of exactly 0 elects +, as PEFT's
    merged = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for factor, coef in zip(factors, coefs, strict=True):
        agree = torch.where(positive, factor > 0, factor < 0)
        merged.add_(factor * agree, alpha=coef)
        count.add_(agree.to(count.dtype))
    return merged.div_(count.clamp_min_(1.0))


@register("average", "linear", normalised=True)
@register("task-average", "linear", normalised=True)
def _linear(factors: list[Tensor], coefs: list[float], opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    return _weighted_sum(factors, coefs)


@register("ties", "ties")
def _ties(factors: list[Tensor], coefs: list[float], opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    return _elect_and_disjoint_sum([trim_by_magnitude(f, opts.density) for f in factors], coefs)


@register("dare", "dare_linear", random=True)
def _dare(factors: list[Tensor], coefs: list[float], opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    return _weighted_sum([drop_and_rescale(f, opts.drop_rate, generator) for f in factors], coefs)


@register("ties-dare", "dare_ties", random=True)
def _ties_dare(factors: list[Tensor], coefs: list[float], opts: MergeOptions,
               generator: torch.Generator | None) -> Tensor:
    return _elect_and_disjoint_sum([drop_and_rescale(f, opts.drop_rate, generator) for f in factors], coefs)


def merge_lora_factors(
    method: str,
    factors: Sequence[tuple[Tensor, Tensor, float]],
    weights: Sequence[float],
    options: MergeOptions,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(A', B') of the merged adapter at scale 1, from each adapter's (A, B, scale) of one module (float32, all of
    one rank; the tensors are the caller's to give away). Draws A's masks before B's, adapter by adapter."""
    chosen = get_factor_method(method)
    if len({a.shape for a, _, _ in factors}) != 1 or len({b.shape for _, b, _ in factors}) != 1:
        raise KnowstackError("merging LoRA factors needs adapters of one rank (PEFT's rule for this merge); merge "
                             "the deltas instead (lora_space: delta)", field="lora_space")
    total = sum(weights)
    coefs = [(w / total if chosen.normalised else w) * scale for w, (_, _, scale) in zip(weights, factors, strict=True)]
    coefs_a = [math.copysign(math.sqrt(abs(c)), c) for c in coefs]
    coefs_b = [math.sqrt(abs(c)) for c in coefs]
    merged_a = chosen.fn([a for a, _, _ in factors], coefs_a, options, generator)
    merged_b = chosen.fn([b for _, b, _ in factors], coefs_b, options, generator)
    if method != "average":
        merged_b.mul_(options.lam)
    return merged_a, merged_b
