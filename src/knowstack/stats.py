"""Uncertainty of every compared number: seeded percentile bootstraps over test items (and seeds).

One idea, used by the study's results, the report and the registry's gate alike:

- every score is a mean of per-item scores on a fixed list of test items;
- a column (one task's items) gets one matrix of resampled item indices, drawn from a generator seeded by
  the column's key, and every model scored on those items is resampled with the same indices: any
  difference between two models (a gain from base, a BWT, one method against another) is then a *paired*
  bootstrap, item by item;
- with several training seeds, a replicate first draws seeds with replacement (shared by every model, so
  seed s of one method stays beside seed s of another), then the items (a hierarchical bootstrap): the
  interval covers seed and item variance together;
- an `Estimate` is a float that carries its bootstrap replicates through arithmetic, so a derived number
  (an average of columns, a percent change, a difference) keeps its replicates and gets its interval.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


def _generator(key: str, seed: int = SEED) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


@lru_cache(maxsize=256)
def item_indices(n: int, key: str, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) item indices drawn with replacement; the same for every model scored on `key`'s items."""
    indices = _generator(f"items:{key}", seed).integers(0, n, size=(resamples, n))
    indices.flags.writeable = False
    return indices


@lru_cache(maxsize=16)
def seed_indices(k: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, k) seed positions drawn with replacement, shared by every column and model."""
    indices = _generator("seeds", seed).integers(0, k, size=(resamples, k))
    indices.flags.writeable = False
    return indices


def interval(draws: np.ndarray | None, level: float = LEVEL) -> tuple[float, float] | None:
    """The percentile interval of bootstrap replicates; None without replicates (or none finite)."""
    if draws is None:
        return None
    finite = np.asarray(draws, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


class Estimate(float):
    """A number with its bootstrap replicates (`draws`, None for an exact number). Arithmetic with floats or
    other estimates keeps the replicates, element by element, so paired resampling carries through."""

    draws: np.ndarray | None

    def __new__(cls, value: float, draws: np.ndarray | None = None) -> Estimate:
        made = super().__new__(cls, value)
        made.draws = None if draws is None else np.asarray(draws, dtype=float)
        return made

    @property
    def interval(self) -> tuple[float, float] | None:
        return interval(self.draws)

    def _combine(self, other: object, op, swap: bool = False) -> Estimate:
        if not isinstance(other, float | int):
            return NotImplemented
        a, b = (float(other), float(self)) if swap else (float(self), float(other))
        other_draws = getattr(other, "draws", None)
        mine = self.draws if self.draws is not None else (None if other_draws is None else float(self))
        theirs = other_draws if other_draws is not None else (None if self.draws is None else float(other))
        draws = None
        if mine is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                draws = op(theirs, mine) if swap else op(mine, theirs)
        try:
            value = op(a, b)
        except ZeroDivisionError:
            value = float("nan")
        return Estimate(value, draws)

    def __add__(self, other):
        return self._combine(other, np.add)

    def __radd__(self, other):
        return self._combine(other, np.add, swap=True)

    def __sub__(self, other):
        return self._combine(other, np.subtract)

    def __rsub__(self, other):
        return self._combine(other, np.subtract, swap=True)

    def __mul__(self, other):
        return self._combine(other, np.multiply)

    def __rmul__(self, other):
        return self._combine(other, np.multiply, swap=True)

    def __truediv__(self, other):
        return self._combine(other, _divide)

    def __rtruediv__(self, other):
        return self._combine(other, _divide, swap=True)

    def __neg__(self):
        return Estimate(-float(self), None if self.draws is None else -self.draws)

    def __abs__(self):
        return Estimate(abs(float(self)), None if self.draws is None else np.abs(self.draws))

    def __reduce__(self):
        return (Estimate, (float(self), self.draws))


def _divide(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a / b
    return np.divide(a, b)


def interval_of(value: object) -> tuple[float, float] | None:
    """The interval of a number that carries replicates; None for a plain number."""
    return value.interval if isinstance(value, Estimate) else None


def column_estimate(per_seed: Sequence[Sequence[float]], key: str, resamples: int = RESAMPLES,
                    seed: int = SEED) -> Estimate:
    """A column's score (the mean over seeds of each seed's mean over items) with its replicates: seeds drawn
    with replacement, then items, the items' indices shared by every seed (they are the same test items)."""
    scores = np.asarray([np.asarray(s, dtype=float) for s in per_seed])
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"per-item scores of '{key}' must be one non-empty list per seed of equal length")
    k, n = scores.shape
    item_means = scores[:, item_indices(n, key, resamples, seed)].mean(axis=2)  # (k, resamples)
    if k == 1:
        draws = item_means[0]
    else:
        chosen = seed_indices(k, resamples, seed)  # (resamples, k)
        draws = item_means[chosen, np.arange(resamples)[:, None]].mean(axis=1)
    return Estimate(float(scores.mean()), draws)


def mean_interval(scores: Sequence[float], key: str, resamples: int = RESAMPLES,
                  seed: int = SEED) -> tuple[float, float] | None:
    """The 95% interval of the mean of one list of per-item scores (a results row's ci_low, ci_high)."""
    if len(scores) == 0:
        return None
    return column_estimate([scores], key, resamples, seed).interval


def mean_of(values: Sequence[float]) -> float:
    """The mean, keeping replicates when the values carry them (statistics.mean would drop them)."""
    total: float = 0.0
    for value in values:
        total = total + value
    return total / len(values)


def maximum_of(values: Sequence[float]) -> float:
    """The largest value, keeping replicates: each replicate's maximum over the values' replicates (the paired
    bootstrap of a maximum, as forgetting's best earlier score needs); a plain float where any value has none."""
    best = max(values, key=float)
    draws = [getattr(v, "draws", None) for v in values]
    if any(d is None for d in draws):
        return float(best)
    return Estimate(float(best), np.max(np.stack(draws), axis=0))
