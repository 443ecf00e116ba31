"""The forgetting gate with paired intervals: a version whose point score falls below the floor by what may be
noise is rejected by the rule (the point decides) and its verdict is inconclusive; a version with a real loss
fails with the interval beyond the allowance; both record the interval and n, and `show` / `log` print them."""

from __future__ import annotations

import numpy as np
import pytest

from knowstack.registry.gate import Released, gate_checks, gate_record
from knowstack.stats import column_estimate

N = 200  # items per task, as the stored test splits of a small registry


def correct(p: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return (rng.random(N) < p).astype(float).tolist()


def flipped(items: list[float], seed: int, right_to_wrong: int, wrong_to_right: int) -> list[float]:
    """The same answers with a few items changed: what re-scoring a slightly perturbed model gives."""
    rng = np.random.default_rng(seed)
    out = np.array(items)
    right, wrong = np.flatnonzero(out == 1), np.flatnonzero(out == 0)
    out[rng.choice(right, right_to_wrong, replace=False)] = 0
    out[rng.choice(wrong, wrong_to_right, replace=False)] = 1
    return out.tolist()


def mean(items: list[float]) -> float:
    return sum(items) / len(items)


@pytest.fixture
def base() -> Released:
    items = {"old/ks_a": correct(0.6, 1), "old/ks_b": correct(0.7, 2), "new/stance": correct(0.3, 3)}
    return Released("base", (mean(items["old/ks_a"]) + mean(items["old/ks_b"])) / 2,
                    {"stance": mean(items["new/stance"])}, items)


def version(base: Released, changes: dict[str, tuple[int, int]], seed: int) -> dict[str, list[float]]:
    return {key: flipped(items, seed + i, *changes.get(key, (0, 0))) for i, (key, items) in enumerate(base.items.items())}


def checks_of(items: dict[str, list[float]], base: Released, with_items: bool = True):
    ave = (mean(items["old/ks_a"]) + mean(items["old/ks_b"])) / 2
    return gate_checks(ave, {"stance": mean(items["new/stance"])}, base, base, old_limit=2.0, task_limit=10.0,
                       items=items if with_items else None)


def test_a_noisy_version_below_the_floor_is_inconclusive_and_not_released(base: Released) -> None:
    # Noise: 9 answers of 200 go wrong and 3 go right on each old task (and on stance): the point AVE falls 4.5%,
    # beyond the 2% limit, but the paired interval of the difference reaches above the allowance.
    noisy = version(base, {"old/ks_a": (9, 3), "old/ks_b": (9, 3), "new/stance": (6, 2)}, seed=10)
    point_only = {c.what: c for c in checks_of(noisy, base, with_items=False)}
    assert not point_only["old AVE"].passed and point_only["old AVE"].verdict == "fails"
    gated = {c.what: c for c in checks_of(noisy, base)}
    old = gated["old AVE"]
    assert old.value < old.floor and old.has_interval and not old.passed and old.n == 2 * N
    assert old.ci_low < old.floor - old.reference < old.ci_high  # the interval covers both sides
    assert old.verdict == "inconclusive"
    record = gate_record(list(gated.values()), 2.0, 10.0)
    assert not record["passed"] and record["failed"] == [old.describe()]
    # stance fell 7% (within its 10% limit) and its interval reaches beyond it: released on it, but inconclusive
    stance = gated["task stance"]
    assert stance.passed and record["inconclusive"] == [old.describe(), stance.describe()]
    assert "inconclusive (the point is beyond the limit" in old.describe() and "-0.0" in old.describe()

    # A real loss: a third of the right answers go wrong on both old tasks.
    harmful = version(base, {"old/ks_a": (40, 0), "old/ks_b": (47, 0)}, seed=20)
    checks = {c.what: c for c in checks_of(harmful, base)}
    lost = checks["old AVE"]
    assert not lost.passed and lost.ci_high < lost.floor - lost.reference
    record = gate_record(list(checks.values()), 2.0, 10.0)
    assert not record["passed"] and record["failed"][0].endswith(": fails") and "[-0." in record["failed"][0]
    stored = next(c for c in record["checks"] if c["what"] == "old AVE")
    assert stored["ci_low"] == pytest.approx(lost.ci_low) and stored["ci_high"] == pytest.approx(lost.ci_high)
    assert checks["task stance"].passed  # untouched: a difference of exactly 0


def test_the_interval_is_paired_on_the_same_items(base: Released) -> None:
    """The gate's interval of a difference is narrower than the two scores' own intervals would suggest: the same
    items are resampled for both (an unpaired interval of a 12-item change on 200 items would span ~±0.1)."""
    noisy = version(base, {"old/ks_a": (9, 3)}, seed=30)
    [check] = [c for c in checks_of(noisy, base) if c.what == "old AVE"]
    width = check.ci_high - check.ci_low
    own = column_estimate([base.items["old/ks_a"]], "old/ks_a").interval
    assert width < (own[1] - own[0]) / 2


def test_without_per_item_scores_the_gate_compares_points(base: Released) -> None:
    legacy = Released("v0", base.old_average, base.task_scores)  # recorded before per-item scores were kept
    checks = gate_checks(base.old_average * 0.97, {}, legacy, legacy, 2.0, 10.0,
                         items={"old/ks_a": base.items["old/ks_a"], "old/ks_b": base.items["old/ks_b"]})
    assert not checks[0].has_interval and not checks[0].passed
    assert "no interval (per-item scores not kept)" in checks[0].describe() and checks[0].n is None
