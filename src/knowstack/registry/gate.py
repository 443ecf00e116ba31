"""The forgetting gate: what a composed version must keep to be released.

A candidate fails when its old-knowledge AVE falls more than `old_limit` percent below the base's or
the previous released version's, or when its score on any registered task falls more than `task_limit`
percent below that task's best released score. Limits are relative (a 2% limit on AVE 0.90 allows 0.882);
a task may also be given an absolute slack in score points (`task_slack`), the larger allowance winning:
a task the line barely solves (0.006) would otherwise fail a 10% limit on a single example.

Noise does not fail a version: where the candidate and its reference were scored on the same stored test items
and both kept their per-item scores, each check carries the paired 95% bootstrap interval of the difference
(candidate - reference, stats.py), and a check fails only when the whole interval lies below the allowance,
that is when the data support a loss beyond the limit; a loss within the noise passes, and says so. Without
per-item scores (versions recorded before they were kept) a check compares the two point scores.

"Released" means the shared model's line: the base and the composed versions released so far.
Contributions are not references: each is a specialist scored on its own task only, and any model
built from several of them scores below each specialist on its task (the paper's one-round upper
bound), so measuring against them would reject every composition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from knowstack.stats import Estimate, column_estimate, mean_of


@dataclass(frozen=True)
class Check:
    what: str  # "old AVE" or "task <name>"
    value: float
    reference: float
    reference_version: str
    limit_pct: float
    slack: float = 0.0  # absolute allowance in score points; the floor is the lower of the two
    ci_low: float | None = None  # the paired 95% interval of value - reference, where both kept per-item scores
    ci_high: float | None = None

    @property
    def floor(self) -> float:
        return min(self.reference * (1 - self.limit_pct / 100), self.reference - self.slack)

    @property
    def change_pct(self) -> float | None:
        return 100 * (self.value - self.reference) / self.reference if self.reference else None

    @property
    def has_interval(self) -> bool:
        return self.ci_low is not None and self.ci_high is not None

    @property
    def below_floor(self) -> bool:
        # A 1e-9 slack: a score equal to its reference passes even after float round trips.
        return self.value < self.floor - 1e-9

    @property
    def passed(self) -> bool:
        """Fails when the loss beyond the allowance is supported: the whole interval of the difference lies below
        floor - reference; without an interval, when the point score is below the floor."""
        if not self.has_interval:
            return not self.below_floor
        return not self.ci_high < self.floor - self.reference - 1e-9

    def interval_text(self) -> str:
        if not self.has_interval:
            return "no interval"
        return f"difference {self.value - self.reference:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}]"

    def describe(self) -> str:
        change = f"{self.change_pct:+.1f}%" if self.change_pct is not None else "n/a"
        verdict = "ok" if self.passed else "FAILS"
        if self.passed and self.below_floor:
            verdict = "ok (below the floor, within the noise)"
        allowance = f"-{self.limit_pct:g}%" + (f" or -{self.slack:g} points" if self.slack else "")
        interval = f"; {self.interval_text()}" if self.has_interval else ""
        return (f"{self.what} {self.value:.3f} vs {self.reference_version} {self.reference:.3f} ({change}; "
                f"floor {self.floor:.3f} at {allowance}{interval}): {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "floor": round(self.floor, 6), "passed": self.passed}


@dataclass(frozen=True)
class Released:
    """One released version of the shared model's line, as the gate sees it."""

    name: str
    old_average: float | None
    task_scores: dict[str, float]
    items: dict[str, list[float]] = field(default_factory=dict)  # "old/<task>" | "new/<task>" -> per-item scores


def _paired(mine: dict[str, list[float]], theirs: dict[str, list[float]], keys: list[str]
            ) -> tuple[float | None, float | None]:
    """The 95% interval of (mean over `keys` of my item means) - (the same of theirs), resampling each key's items
    jointly for both; (None, None) unless both have every key's scores on the same number of items."""
    if not keys or any(k not in mine or k not in theirs or len(mine[k]) != len(theirs[k]) or not mine[k]
                       for k in keys):
        return None, None
    difference = (mean_of([column_estimate([mine[k]], k) for k in keys])
                  - mean_of([column_estimate([theirs[k]], k) for k in keys]))
    ci = difference.interval if isinstance(difference, Estimate) else None
    return (None, None) if ci is None else ci


def gate_checks(
    old_average: float | None,
    task_scores: dict[str, float],
    base: Released,
    previous: Released | None,
    line: Sequence[Released],
    old_limit: float,
    task_limit: float,
    task_slack: float = 0.0,
    items: dict[str, list[float]] | None = None,
) -> list[Check]:
    """Every check of the candidate (its AVE and {task: score}) against the released line (base first). items: the
    candidate's per-item scores ("old/<task>", "new/<task>"); with the reference's, each check gets its interval."""
    items = items or {}
    old_keys = sorted(k for k in items if k.startswith("old/"))
    checks = []
    if old_average is not None:
        for reference in (base, previous):
            if reference is not None and reference.old_average is not None:
                low, high = _paired(items, reference.items, old_keys)
                checks.append(Check("old AVE", old_average, reference.old_average, reference.name, old_limit,
                                    ci_low=low, ci_high=high))
    by_name = {released.name: released for released in line}
    for task, value in task_scores.items():
        scored = [(released.task_scores[task], released.name) for released in line if task in released.task_scores]
        if scored:
            best, holder = max(scored, key=lambda pair: pair[0])
            low, high = _paired(items, by_name[holder].items, [f"new/{task}"])
            checks.append(Check(f"task {task}", value, best, holder, task_limit, task_slack, ci_low=low,
                                ci_high=high))
    return checks


def gate_record(checks: Sequence[Check], old_limit: float, task_limit: float, task_slack: float = 0.0
                ) -> dict[str, Any]:
    failed = [check.describe() for check in checks if not check.passed]
    noise = [check.describe() for check in checks if check.passed and check.below_floor]
    record = {"old_limit_pct": old_limit, "task_limit_pct": task_limit, "task_slack": task_slack,
              "passed": not failed, "failed": failed, "checks": [check.to_dict() for check in checks]}
    if noise:
        record["within_noise"] = noise  # below a floor, but the interval does not support a loss beyond it
    return record
