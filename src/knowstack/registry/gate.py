"""The forgetting gate: what a composed version must keep to be released.

A version is gated against what it was built from: the base, or the released version it was built on (`compose
--from`). A candidate fails when its old-knowledge AVE falls more than `old_limit` percent below that version's
(and, when built on a release, below the base's too, so that forgetting cannot add up release by release), or when
its score on any registered task falls more than `task_limit` percent below that version's score on the task (the
base's, for a task the version built on was never scored on). Limits are relative (a 2% limit on AVE 0.90 allows
0.882); a task may also be given an absolute slack in score points (`task_slack`), the larger allowance winning:
a task the line barely solves (0.006) would otherwise fail a 10% limit on a single example.

The rule decides on the point scores: a version beyond its limit is not released unless the maintainer forces it
(`compose --force-release`, recorded and shown as forced). Each check also carries its uncertainty: where the
candidate and its reference were scored on the same stored test items and both kept their per-item scores, the
paired 95% bootstrap interval of the difference (candidate - reference, stats.py) and the number of paired items.
Its verdict says what the data support: "holds" (the whole interval is within the allowance), "fails" (the whole
interval is beyond it) or "inconclusive" (the interval reaches both sides: these test items cannot tell). Without
per-item scores (versions recorded before they were kept) the verdict is the point comparison.

Contributions are not references: each is a specialist scored on its own task only, and any model built from
several of them scores below each specialist on its task (the paper's one-round upper bound), so measuring against
them would reject every composition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from knowstack.stats import Estimate, column_estimate, mean_of

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"
_EPS = 1e-9  # a score equal to its floor passes even after float round trips


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
    n: int | None = None  # the paired test items behind the interval

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Check:
        """A check as recorded (to_dict, or an older record without n)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})

    @property
    def floor(self) -> float:
        return min(self.reference * (1 - self.limit_pct / 100), self.reference - self.slack)

    @property
    def allowance(self) -> float:
        """The largest loss allowed, as a difference (floor - reference, <= 0)."""
        return self.floor - self.reference

    @property
    def difference(self) -> float:
        return self.value - self.reference

    @property
    def change_pct(self) -> float | None:
        return 100 * self.difference / self.reference if self.reference else None

    @property
    def has_interval(self) -> bool:
        return self.ci_low is not None and self.ci_high is not None

    @property
    def below_floor(self) -> bool:
        return self.value < self.floor - _EPS

    @property
    def passed(self) -> bool:
        """The gate's rule: the point score is not below the floor."""
        return not self.below_floor

    @property
    def verdict(self) -> str:
        """What the data support: holds / fails where the whole interval lies on one side of the allowance,
        inconclusive where it reaches both; without an interval, the point comparison."""
        if not self.has_interval:
            return FAILS if self.below_floor else HOLDS
        if self.ci_high < self.allowance - _EPS:
            return FAILS
        if self.ci_low >= self.allowance - _EPS:
            return HOLDS
        return INCONCLUSIVE

    def change_text(self) -> str:
        relative = f" ({self.change_pct:+.1f}%)" if self.change_pct is not None else ""
        return f"{self.difference:+.3f}{relative}"

    def allowed_text(self) -> str:
        return f"-{self.limit_pct:g}%" + (f" or -{self.slack:g} points" if self.slack else "")

    def interval_text(self) -> str:
        """The paired interval of the difference and its n, or what is missing."""
        if not self.has_interval:
            return "no interval (per-item scores not kept)"
        n = f", n {self.n}" if self.n else ""
        return f"95% [{self.ci_low:+.3f}, {self.ci_high:+.3f}]{n}"

    def verdict_text(self) -> str:
        """The verdict and, where it is inconclusive, which way the rule decided on the point score."""
        if self.verdict != INCONCLUSIVE:
            return self.verdict
        side = "beyond" if self.below_floor else "within"
        return f"inconclusive (the point is {side} the limit; the interval reaches both sides)"

    def describe(self) -> str:
        return (f"{self.what} {self.value:.3f} vs {self.reference_version} {self.reference:.3f}: "
                f"{self.change_text()}, {self.interval_text()}; floor {self.floor:.3f} at {self.allowed_text()}: "
                f"{self.verdict_text()}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "floor": round(self.floor, 6), "passed": self.passed, "verdict": self.verdict}


@dataclass(frozen=True)
class Released:
    """One released version of the shared model's line, as the gate sees it."""

    name: str
    old_average: float | None
    task_scores: dict[str, float]
    items: dict[str, list[float]] = field(default_factory=dict)  # "old/<task>" | "new/<task>" -> per-item scores


def _paired(mine: dict[str, list[float]], theirs: dict[str, list[float]], keys: list[str]
            ) -> tuple[float | None, float | None, int | None]:
    """The 95% interval of (mean over `keys` of my item means) - (the same of theirs), resampling each key's items
    jointly for both, and the number of paired items; Nones unless both have every key's scores on the same items."""
    if not keys or any(k not in mine or k not in theirs or len(mine[k]) != len(theirs[k]) or not mine[k]
                       for k in keys):
        return None, None, None
    difference = (mean_of([column_estimate([mine[k]], k) for k in keys])
                  - mean_of([column_estimate([theirs[k]], k) for k in keys]))
    ci = difference.interval if isinstance(difference, Estimate) else None
    return (None, None, None) if ci is None else (ci[0], ci[1], sum(len(mine[k]) for k in keys))


def gate_checks(
    old_average: float | None,
    task_scores: dict[str, float],
    built_from: Released,
    base: Released,
    old_limit: float,
    task_limit: float,
    task_slack: float = 0.0,
    items: dict[str, list[float]] | None = None,
) -> list[Check]:
    """Every check of the candidate (its AVE and {task: score}) against what it was built from (`built_from`: the
    base, or the release built on; old knowledge also against the base then). items: the candidate's per-item
    scores ("old/<task>", "new/<task>"); with the reference's, each check gets its interval."""
    items = items or {}
    old_keys = sorted(k for k in items if k.startswith("old/"))
    checks = []
    if old_average is not None:
        for reference in (built_from, base) if base.name != built_from.name else (built_from,):
            if reference.old_average is not None:
                low, high, n = _paired(items, reference.items, old_keys)
                checks.append(Check("old AVE", old_average, reference.old_average, reference.name, old_limit,
                                    ci_low=low, ci_high=high, n=n))
    for task, value in task_scores.items():
        reference = built_from if task in built_from.task_scores else base
        if task in reference.task_scores:
            low, high, n = _paired(items, reference.items, [f"new/{task}"])
            checks.append(Check(f"task {task}", value, reference.task_scores[task], reference.name, task_limit,
                                task_slack, ci_low=low, ci_high=high, n=n))
    return checks


def gate_record(checks: Sequence[Check], old_limit: float, task_limit: float, task_slack: float = 0.0,
                built_from: str | None = None, force: bool = False) -> dict[str, Any]:
    """The gate as recorded in the version's settings: the limits, what it was gated against, every check, the
    failures and the inconclusive ones as sentences; `forced` where it failed and was released anyway."""
    failed = [check.describe() for check in checks if not check.passed]
    inconclusive = [check.describe() for check in checks if check.verdict == INCONCLUSIVE]
    record = {"old_limit_pct": old_limit, "task_limit_pct": task_limit, "task_slack": task_slack,
              "passed": not failed, "failed": failed, "inconclusive": inconclusive,
              "checks": [check.to_dict() for check in checks]}
    if built_from is not None:
        record["against"] = built_from
    if failed and force:
        record["forced"] = True
    return record


def recorded_checks(gate: Mapping[str, Any]) -> list[Check]:
    """A recorded gate's checks, to describe the same way whenever they were recorded."""
    return [Check.from_dict(check) for check in gate.get("checks", [])]


def gate_summary(gate: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> str:
    """One line: what the version was gated against, under which limits, and how it came out (forced included)."""
    if not gate:
        return "no gate recorded"
    slack = f" or -{gate['task_slack']:g} points" if gate.get("task_slack") else ""
    against = gated_against(gate, settings)
    limits = f"old knowledge -{gate['old_limit_pct']:g}% AVE, tasks -{gate['task_limit_pct']:g}%{slack}"
    checks = recorded_checks(gate)
    counts = ", ".join(f"{sum(c.verdict == v for c in checks)} {v}" for v in (HOLDS, INCONCLUSIVE, FAILS)
                       if any(c.verdict == v for c in checks))
    if gate.get("forced"):
        outcome = "FAILED, released anyway (--force-release)"
    else:
        outcome = "passed" if gate["passed"] else "FAILED (rejected)"
    return f"{outcome}; against {against}; {limits}" + (f"; checks: {counts}" if counts else "")


def gated_against(gate: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """Whom the checks compared with: what the version was built from (and the base), or, in records made before
    the gate followed what a version was built from, the base and the previous release."""
    against = gate.get("against")
    if against is None:
        previous = settings.get("previous")
        return f"base and the previous release {previous}" if previous else "base"
    if against == "base":
        return "base (what it was built from)"
    checks = recorded_checks(gate)
    also = ["old knowledge" for c in checks if c.what == "old AVE" and c.reference_version != against][:1]
    also += [c.what for c in checks if c.what.startswith("task ") and c.reference_version != against]
    return f"{against} (what it was built from" + (f"; base for {', '.join(also)})" if also else ")")
