"""The forgetting gate: what a composed version must keep to be released.

A candidate fails when its old-knowledge AVE falls more than `old_limit` percent below the base's or
the previous released version's, or when its score on any registered task falls more than `task_limit`
percent below that task's best released score. Limits are relative (a 2% limit on AVE 0.90 allows 0.882);
a task may also be given an absolute slack in score points (`task_slack`), the larger allowance winning:
a task the line barely solves (0.006) would otherwise fail a 10% limit on a single example.

"Released" means the shared model's line: the base and the composed versions released so far.
Contributions are not references: each is a specialist scored on its own task only, and any model
built from several of them scores below each specialist on its task (the paper's one-round upper
bound), so measuring against them would reject every composition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    what: str  # "old AVE" or "task <name>"
    value: float
    reference: float
    reference_version: str
    limit_pct: float
    slack: float = 0.0  # absolute allowance in score points; the floor is the lower of the two

    @property
    def floor(self) -> float:
        return min(self.reference * (1 - self.limit_pct / 100), self.reference - self.slack)

    @property
    def change_pct(self) -> float | None:
        return 100 * (self.value - self.reference) / self.reference if self.reference else None

    @property
    def passed(self) -> bool:
        # A 1e-9 slack: a score equal to its reference passes even after float round trips.
        return self.value >= self.floor - 1e-9

    def describe(self) -> str:
        change = f"{self.change_pct:+.1f}%" if self.change_pct is not None else "n/a"
        verdict = "ok" if self.passed else "FAILS"
        allowance = f"-{self.limit_pct:g}%" + (f" or -{self.slack:g} points" if self.slack else "")
        return (f"{self.what} {self.value:.3f} vs {self.reference_version} {self.reference:.3f} ({change}; "
                f"floor {self.floor:.3f} at {allowance}): {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "floor": round(self.floor, 6), "passed": self.passed}


@dataclass(frozen=True)
class Released:
    """One released version of the shared model's line, as the gate sees it."""

    name: str
    old_average: float | None
    task_scores: dict[str, float]


def gate_checks(
    old_average: float | None,
    task_scores: dict[str, float],
    base: Released,
    previous: Released | None,
    line: Sequence[Released],
    old_limit: float,
    task_limit: float,
    task_slack: float = 0.0,
) -> list[Check]:
    """Every check of the candidate (its AVE and {task: score}) against the released line (base first)."""
    checks = []
    if old_average is not None:
        for reference in (base, previous):
            if reference is not None and reference.old_average is not None:
                checks.append(Check("old AVE", old_average, reference.old_average, reference.name, old_limit))
    for task, value in task_scores.items():
        scored = [(released.task_scores[task], released.name) for released in line if task in released.task_scores]
        if scored:
            best, holder = max(scored, key=lambda pair: pair[0])
            checks.append(Check(f"task {task}", value, best, holder, task_limit, task_slack))
    return checks


def gate_record(checks: Sequence[Check], old_limit: float, task_limit: float, task_slack: float = 0.0
                ) -> dict[str, Any]:
    failed = [check.describe() for check in checks if not check.passed]
    return {"old_limit_pct": old_limit, "task_limit_pct": task_limit, "task_slack": task_slack,
            "passed": not failed, "failed": failed, "checks": [check.to_dict() for check in checks]}
