"""Merge methods: one small function per method, all with one signature, registered by name.

Every method takes the tensors of one parameter from n models (float32, one shape; the caller's
to give away: methods work in place, so a merge holds no second copy of every model's tensor),
their weights (positive, one per model), the options and a random generator, and returns one tensor:

- methods on *task vectors* (`uses_base=True`) get tau_i = theta_i - theta_base (for LoRA,
  tau_i = scale_i * B_i @ A_i) and return the merged task vector; the caller adds the base;
- `average` gets the full weights and returns their weighted mean (it needs no base; on LoRA
  deltas it is the same thing, as the mean is linear).

Definitions (Yadav et al. 2023 for TIES, Yu et al. 2024 for DARE), with w_i the weights:

- average:       sum_i w_i theta_i / sum_i w_i
- task-average:  lambda * sum_i w_i tau_i / sum_i w_i                        (task arithmetic, normalised)
- ties:          trim each tau_i to its top `density` fraction by magnitude (per tensor), elect each
                 entry's sign by the summed weighted mass sign(sum_i w_i tau_i), and take the weighted
                 mean over the models that agree with it (disjoint mean), times lambda
- dare:          drop each entry of tau_i with probability p, rescale the rest by 1/(1-p), then the
                 weighted mean, times lambda
- ties-dare:     DARE's drop and rescale, then TIES' sign election and disjoint mean, times lambda

With equal weights these are mergekit's `linear`, `ties` (normalize: true) and PEFT's `ties`,
`dare_linear` (weights 1/n) and `dare_ties` (the tests check PEFT's, benchmarks/merge.py mergekit's);
with unequal weights TIES elects the sign from the weighted mass, as mergekit does. (mergekit 0.1.5's
DARE rescales the kept entries to the task vector's L1 norm rather than by 1/(1-p), so only PEFT's
DARE is the papers'.) The one choice of our own: entries tied exactly with TIES' k-th largest
magnitude are all kept, where mergekit's and PEFT's sorts keep an arbitrary subset. Weights are
relative (only their ratios matter), so a merge of seven models stays on the scale of one task
vector rather than seven.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from knowstack.config import MergeConfig
from knowstack.errors import KnowstackError

_DECLARED = MergeConfig()


@dataclass(frozen=True)
class MergeOptions:
    """The knobs of all methods; each method reads the ones it needs."""

    # the defaults are config.py MergeConfig's (the one declaration)
    density: float = _DECLARED.density  # TIES: fraction of each task vector kept, by magnitude, per tensor
    drop_rate: float = _DECLARED.drop_rate  # DARE: probability that an entry of a task vector is dropped
    lam: float = _DECLARED.lam  # scale of the merged task vector (lambda in the TIES and DARE papers)
    # LoRA adapters: merge their deltas s B A (delta), or their A and B factors apart as PEFT does (factors:
    # merge_factors.py, the paper's LoRA TIES / DARE-TIES)
    lora_space: str = "delta"

    def __post_init__(self) -> None:
        if self.lora_space not in ("delta", "factors"):
            raise KnowstackError(f"lora_space must be delta or factors, got {self.lora_space!r}", field="lora_space")
        if not 0 < self.density <= 1:
            raise KnowstackError(f"density must be in (0, 1], got {self.density}", field="density")
        if not 0 <= self.drop_rate < 1:
            raise KnowstackError(f"drop rate must be in [0, 1), got {self.drop_rate}", field="drop_rate")


MergeFn = Callable[[list[Tensor], Tensor, MergeOptions, "torch.Generator | None"], Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    uses_base: bool  # True: works on task vectors relative to a base model
    random: bool  # True: draws from the generator (DARE)


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, uses_base: bool = True, random: bool = False) -> Callable[[MergeFn], MergeFn]:
    def wrap(fn: MergeFn) -> MergeFn:
        METHODS[name] = MergeMethod(name, fn, uses_base, random)
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise KnowstackError(f"unknown merge method '{name}'; choose from {', '.join(METHODS)}", field="method")
    return METHODS[name]


# --- building blocks ------------------------------------------------------------------------------
def weighted_mean(tensors: list[Tensor], weights: Tensor) -> Tensor:
    """sum_i w_i x_i / sum_i w_i, accumulated one model at a time (no stacked copy of all n)."""
    w = weights.tolist()
    out = tensors[0].mul_(w[0])
    for tensor, weight in zip(tensors[1:], w[1:], strict=True):
        out.add_(tensor, alpha=weight)
    return out.div_(sum(w))


def trim_by_magnitude(tau: Tensor, density: float) -> Tensor:
    """Keep the k = max(1, int(density * numel)) largest-magnitude entries of tau, zero the rest (in place).

    The threshold is the k-th largest magnitude, found by selection (numpy's in-place partition of
    one scratch copy: O(n), and unlike torch.kthvalue no int64 index tensor of the whole weight);
    entries that tie with it exactly are all kept, so the result never depends on a tie order. As
    in mergekit, a positive density keeps at least one entry of a (tiny) tensor.
    """
    if density >= 1 or tau.numel() == 0:
        return tau
    k = max(1, int(density * tau.numel()))
    scratch = tau.abs().view(-1).numpy()
    scratch.partition(scratch.size - k)
    threshold = float(scratch[scratch.size - k])
    del scratch
    return tau.mul_((tau >= threshold) | (tau <= -threshold))


def drop_and_rescale(tau: Tensor, drop_rate: float, generator: torch.Generator | None) -> Tensor:
    """DARE (in place): each entry kept with probability 1-p (a Bernoulli draw), then scaled by 1/(1-p)."""
    if drop_rate == 0:
        return tau
    keep = 1.0 - drop_rate
    mask = torch.bernoulli(torch.full_like(tau, keep), generator=generator)
    return tau.mul_(mask).div_(keep)


def elect_and_mean(taus: list[Tensor], weights: Tensor) -> Tensor:
    """TIES' sign election by summed weighted mass, then the weighted mean over the agreeing models.

    A zero entry (trimmed or dropped) agrees with neither sign, so it takes no part in the mean.
    Entry-wise, so it runs on slices of CHUNK entries and writes each result into the first task
    vector: its working memory is a few slices, not a few copies of the weight.
    """
    w = weights.tolist()
    flat = [tau.view(-1) for tau in taus]
    for start in range(0, flat[0].numel(), CHUNK):
        parts = [f[start : start + CHUNK] for f in flat]
        parts[0].copy_(_elect_and_mean_slice(parts, w))
    return taus[0]


CHUNK = 1 << 22


def _elect_and_mean_slice(parts: list[Tensor], w: list[float]) -> Tensor:
    mass = parts[0] * w[0]
    for part, weight in zip(parts[1:], w[1:], strict=True):
        mass.add_(part, alpha=weight)
    positive = mass >= 0  # a mass of exactly 0 elects +, as in mergekit and PEFT
    merged = torch.zeros_like(mass)
    divisor = torch.zeros_like(mass)
    for part, weight in zip(parts, w, strict=True):
        agree = torch.where(positive, part > 0, part < 0)
        merged.add_(part * agree, alpha=weight)
        divisor.add_(agree, alpha=weight)
    return merged.div_(divisor.clamp_min_(torch.finfo(divisor.dtype).tiny))  # 0 where none agree


# --- the methods: the tensors are the caller's to give away (methods work in place) ----------------
@register("average", uses_base=False)
def average(tensors: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    return weighted_mean(tensors, weights)


@register("task-average")
def task_average(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    return weighted_mean(taus, weights).mul_(opts.lam)


@register("ties")
def ties(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    return elect_and_mean([trim_by_magnitude(t, opts.density) for t in taus], weights).mul_(opts.lam)


@register("dare", random=True)
def dare(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    return weighted_mean([drop_and_rescale(t, opts.drop_rate, generator) for t in taus], weights).mul_(opts.lam)


@register("ties-dare", random=True)
def ties_dare(taus: list[Tensor], weights: Tensor, opts: MergeOptions, generator: torch.Generator | None) -> Tensor:
    return elect_and_mean([drop_and_rescale(t, opts.drop_rate, generator) for t in taus], weights).mul_(opts.lam)
