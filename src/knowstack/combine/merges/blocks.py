"""The building blocks the merge methods share, on tensors that are the caller's to give away (in place).

weighted sums and means, TIES' magnitude trim and sign election, DARE's random drop, breadcrumbs' magnitude
band and DELLA's magnitude-ranked drop. Each works one tensor at a time and holds no stacked copy of all n.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 1 << 22
GRAM_CHUNK = 1 << 16  # entries per slice of gram(): n float64 slices of it fit in a core's L2 cache


def scale(tensor: Tensor, factor: float) -> Tensor:
    """tensor * factor, in place; by 1 nothing is done (x * 1 is x, bit for bit): a pass over the weight saved."""
    return tensor if factor == 1 else tensor.mul_(factor)


def weighted_sum(tensors: list[Tensor], weights: Tensor) -> Tensor:
    """sum_i w_i x_i, accumulated one model at a time into the first tensor."""
    w = weights.tolist()
    out = scale(tensors[0], w[0])
    for tensor, weight in zip(tensors[1:], w[1:], strict=True):
        out.add_(tensor, alpha=weight)
    return out


def weighted_mean(tensors: list[Tensor], weights: Tensor) -> Tensor:
    """sum_i w_i x_i / sum_i w_i, accumulated one model at a time (no stacked copy of all n)."""
    return weighted_sum(tensors, weights).div_(sum(weights.tolist()))


def _magnitudes(tau: Tensor) -> object:
    """A scratch numpy copy of |tau|, flat, for selection by partition (O(n), no int64 index of the weight)."""
    return tau.abs().view(-1).numpy()


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
    scratch = _magnitudes(tau)
    scratch.partition(scratch.size - k)
    threshold = float(scratch[scratch.size - k])
    del scratch
    return tau.mul_((tau >= threshold) | (tau <= -threshold))


def keep_magnitude_band(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs (in place): drop the n_top = int(gamma * numel) largest-magnitude entries and the
    smallest, so that int(density * numel) remain (fewer outliers dropped where both cannot be had), as
    mergekit's magnitude_outliers. density >= 1 keeps everything (gamma too has no effect then, as in
    mergekit). Selection by partition like trim_by_magnitude; an entry tied exactly with a band edge is
    kept at the lower edge and dropped at the upper one, where a sort would split the tie arbitrarily."""
    n = tau.numel()
    if density >= 1 or n == 0:
        return tau
    keep = int(density * n)
    if keep == 0:
        return tau.zero_()
    bottom = max(0, n - keep - int(gamma * n))  # ascending rank of the first entry kept
    top = bottom + keep  # ascending rank of the first entry dropped again (n: none)
    scratch = _magnitudes(tau)
    scratch.partition([bottom, top] if top < n else [bottom])
    low = float(scratch[bottom])
    high = float(scratch[top]) if top < n else float("inf")
    del scratch
    magnitude = tau.abs()
    return tau.mul_((magnitude >= low) & (magnitude < high))


def drop_and_rescale(tau: Tensor, drop_rate: float, generator: torch.Generator | None) -> Tensor:
    """DARE (in place): each entry kept with probability 1-p (a Bernoulli draw), then scaled by 1/(1-p)."""
    if drop_rate == 0:
        return tau
    keep = 1.0 - drop_rate
    mask = torch.bernoulli(torch.full_like(tau, keep), generator=generator)
    return tau.mul_(mask).div_(keep)


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probability of every entry: density - epsilon for the smallest magnitude of its
    row up to density + epsilon for the largest, linear in the magnitude's rank within the row (a 1-d
    tensor is one row), in float32 as mergekit computes it, so that the same draws keep the same entries.
    Ranks are computed a block of rows at a time: the int64 sort indices never span the whole weight."""
    rows = tau.view(1, -1) if tau.dim() < 2 else tau.view(tau.shape[0], -1)
    probs = torch.empty(rows.shape, dtype=torch.float32)
    width = rows.shape[1]
    step = max(1, CHUNK // max(width, 1))
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step].abs()
        ranks = block.argsort(dim=1).argsort(dim=1).to(torch.float32)  # 0 .. width-1
        # a row of one entry has no spread: its probability is density (mergekit's formula gives 0/0 there)
        rank_norm = ranks.div_(width - 1) if width > 1 else ranks.fill_(0.5)
        probs[start:start + step] = rank_norm.mul_(2 * epsilon).add_(density - epsilon)
    return probs.view(tau.shape)


def della_drop(tau: Tensor, density: float, epsilon: float, generator: torch.Generator | None) -> Tensor:
    """DELLA's drop (in place), as mergekit's della_magprune with rescale: each entry kept with its
    magnitude-ranked probability (della_keep_probabilities), then the kept entries scaled together so that
    the task vector keeps its L1 norm (unless either norm is below 1e-7). density >= 1 keeps everything."""
    if density >= 1:
        return tau
    mask = torch.bernoulli(della_keep_probabilities(tau, density, epsilon), generator=generator)
    before = float(tau.abs().sum(dtype=torch.float64))
    tau.mul_(mask)
    del mask
    after = float(tau.abs().sum(dtype=torch.float64))
    if before < 1e-7 or after < 1e-7:
        return tau
    return tau.mul_(before / after)


def elect_and_mean(taus: list[Tensor], weights: Tensor, normalize: bool = True) -> Tensor:
    """TIES' sign election by summed weighted mass, then the weighted mean over the agreeing models
    (normalize=False: their weighted sum, as mergekit's breadcrumbs_ties).

    A zero entry (trimmed or dropped) agrees with neither sign, so it takes no part in the mean.
    Entry-wise, so it runs on slices of CHUNK entries and writes each result into the first task
    vector: its working memory is a few slices, not a few copies of the weight.
    """
    w = weights.tolist()
    flat = [tau.view(-1) for tau in taus]
    for start in range(0, flat[0].numel(), CHUNK):
        parts = [f[start : start + CHUNK] for f in flat]
        parts[0].copy_(_elect_and_mean_slice(parts, w, normalize))
    return taus[0]


def _elect_and_mean_slice(parts: list[Tensor], w: list[float], normalize: bool) -> Tensor:
    mass = parts[0] * w[0]
    for part, weight in zip(parts[1:], w[1:], strict=True):
        mass.add_(part, alpha=weight)
    positive = mass >= 0  # a mass of exactly 0 elects +, as in mergekit and PEFT
    merged = torch.zeros_like(mass)
    divisor = torch.zeros_like(mass)
    for part, weight in zip(parts, w, strict=True):
        agree = torch.where(positive, part > 0, part < 0)
        merged.add_(part * agree, alpha=weight)
        if normalize:
            divisor.add_(agree, alpha=weight)
    if not normalize:
        return merged
    return merged.div_(divisor.clamp_min_(torch.finfo(divisor.dtype).tiny))  # 0 where none agree


def dot(a: Tensor, b: Tensor) -> float:
    """<a, b> over all entries, in float64 a slice at a time (no float64 copy of the weight)."""
    return float(gram([a, b])[0, 1])


def gram(tensors: list[Tensor]) -> Tensor:
    """<x_i, x_j> for every pair (the diagonal: squared norms), in float64, each tensor read once: a slice of all at a
    time, so n tensors cost n reads where norms and pairwise dots cost n + n(n-1). The slices are copied into one
    float64 buffer small enough to stay in the CPU's cache (measured 7x faster than converting 4M-entry slices)."""
    flat = [tensor.reshape(-1) for tensor in tensors]
    products = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    size = flat[0].numel()
    buffer = torch.empty(len(flat), min(GRAM_CHUNK, size), dtype=torch.float64)
    for start in range(0, size, GRAM_CHUNK):
        rows = buffer[:, :min(GRAM_CHUNK, size - start)]
        for row, x in zip(rows, flat, strict=True):
            row.copy_(x[start:start + rows.shape[1]])
        products.addmm_(rows, rows.T)
    return products


def norm(a: Tensor) -> float:
    """The L2 norm over all entries, in float64."""
    return float(torch.linalg.vector_norm(a, dtype=torch.float64))
