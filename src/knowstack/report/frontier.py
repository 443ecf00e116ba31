"""The learn/forget frontier: each method's trade-off across its settings (sweep points), its Pareto front,
and the FFT-vs-LoRA comparisons at matched acquisition.

A point is one run at one setting: its new-knowledge gain (AVnew, % vs base) and its old-knowledge change
(AVE, % vs base), and for staged runs its mean BWT (recent knowledge). Every front starts at the base,
(0, 0): training with a learning rate going to 0 leaves the base as it is. Between measured points a front
is linear; comparisons are made only where both fronts have been measured (or reach from the base).
"""

from __future__ import annotations

from dataclasses import dataclass

from knowstack.report.runs import (
    Run,
    average_gains,
    backward_transfer,
    mean_defined,
    run_averages,
    stages_done,
)
from knowstack.report.tables import Scores
from knowstack.study.methods import methods_in

# Runs that are one model holding every task's knowledge (a one-round run is a model per task: the upper
# bound, not a candidate), by what they need: semi-cooperative methods need only the contributed models
# (sequential training passes a model from contributor to contributor), fully-cooperative ones all data.
SEMI_COOPERATIVE = methods_in("semi")  # the catalog's (study/methods/)
FULLY_COOPERATIVE = methods_in("full")


@dataclass(frozen=True)
class TradeOff:
    """One run at one setting: what it learned and what it lost, in percent of the base's scores."""

    run: Run
    new_gain: float | None  # AVnew vs base, %; None where the base's AVnew is 0 (a gain from 0 is undefined)
    old_change: float | None  # AVE vs base, %; None where the base's AVE is 0
    bwt: float | None  # mean BWT over tasks, % (staged runs only)
    new: float | None = None  # AVnew itself: what advice ranks on where gains are undefined
    old: float | None = None  # AVE itself

    @property
    def gained(self) -> bool:
        """Whether both gains from the base are defined: only such points lie on a front."""
        return self.new_gain is not None and self.old_change is not None

    @property
    def family(self) -> str:
        return frontier_family(self.run)

    @property
    def setting(self) -> str:
        """The sweep point that sets this run apart ('lr=0.001, rank=16'), or 'own setting' (O-LoRA's lambda
        is in the run's label already)."""
        return self.run.point.replace(",", ", ") if self.run.point else "own setting"


def frontier_family(run: Run) -> str:
    """The runs one front is drawn through: a method at every setting (O-LoRA's lambdas are settings too)."""
    return "olora/lora" if run.method == "olora" else run.family


def left_out(scores: Scores, run: Run, rounds: int) -> str:
    """Why a run is not a learn/forget point ('' where it is one): the base, a partial run, a missing average."""
    if run.method == "base":
        return "the reference"
    partial = stages_done(run, rounds)
    if partial:
        return f"partial: {partial}"
    averages = run_averages(scores, run)
    missing = [name for name in ("AVnew", "AVE") if averages[name] is None]
    return f"no {' or '.join(missing)}: a column is not measured" if missing else ""


def trade_offs(scores: Scores, runs: list[Run], rounds: int) -> list[TradeOff]:
    """Every complete run but the base with both averages measured; gains from the base where defined."""
    points = []
    for run in runs:
        if left_out(scores, run, rounds):
            continue
        gains, averages = average_gains(scores, run), run_averages(scores, run)
        bwt = mean_defined(list(backward_transfer(scores, run).values())) if run.staged else None
        points.append(TradeOff(run, gains["AVnew"], gains["AVE"], bwt, averages["AVnew"], averages["AVE"]))
    return points


def gained(points: list[TradeOff]) -> list[TradeOff]:
    """The points with both gains defined: what fronts are drawn through (in % of the base's scores)."""
    return [p for p in points if p.gained]


def families(points: list[TradeOff]) -> dict[str, list[TradeOff]]:
    out: dict[str, list[TradeOff]] = {}
    for point in points:
        out.setdefault(point.family, []).append(point)
    return out


def pareto_front(points: list[TradeOff], old: str = "old_change") -> list[TradeOff]:
    """The points no other point beats on both new gain and `old` (old_change, or bwt), by new gain."""
    valued = [p for p in points if getattr(p, old) is not None]

    def beaten(p: TradeOff) -> bool:
        return any(q.new_gain >= p.new_gain and getattr(q, old) >= getattr(p, old)
                   and (q.new_gain > p.new_gain or getattr(q, old) > getattr(p, old)) for q in valued)

    return sorted((p for p in valued if not beaten(p)), key=lambda p: p.new_gain)


def front_line(front: list[TradeOff], old: str = "old_change") -> list[tuple[float, float]]:
    """The front as (new gain, old change) vertices from the base: the points past the origin that the base
    itself does not beat (a setting that loses more than it learns is dominated by not training)."""
    return [(0.0, 0.0), *[(p.new_gain, getattr(p, old)) for p in front if p.new_gain > 0]]


def _interpolate(line: list[tuple[float, float]], x: float) -> float | None:
    """y at x on a polyline sorted by x; None outside it."""
    for (x0, y0), (x1, y1) in zip(line, line[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return line[0][1] if len(line) == 1 and line[0][0] == x else None


def old_at_gain(front: list[TradeOff], gain: float) -> float | None:
    """The old-knowledge change of a front at a new-knowledge gain (% vs base), interpolated."""
    return _interpolate(front_line(front), gain)


def gain_at_old(front: list[TradeOff], change: float) -> float | None:
    """The new-knowledge gain of a front at an old-knowledge change (% vs base), interpolated: along the front
    the gain rises as the change falls, so the front read the other way round is a function too."""
    line = sorted((y, x) for x, y in front_line(front))
    return _interpolate(line, change)


@dataclass(frozen=True)
class Matched:
    """Two fronts compared at one level: the level (a gain, or a change, in % vs base) and each side's value."""

    level: float
    left: float
    right: float


def matched_acquisition(left: list[TradeOff], right: list[TradeOff]) -> Matched | None:
    """Old-knowledge change of each front at the largest new-knowledge gain both reach."""
    reach = [max((v[0] for v in front_line(f)), default=0.0) for f in (left, right)]
    level = min(reach)
    if level <= 0:
        return None
    a, b = old_at_gain(left, level), old_at_gain(right, level)
    return None if a is None or b is None else Matched(level, a, b)


def matched_forgetting(left: list[TradeOff], right: list[TradeOff]) -> Matched | None:
    """New-knowledge gain of each front at the largest old-knowledge loss both reach."""
    reach = [min((v[1] for v in front_line(f)), default=0.0) for f in (left, right)]
    level = max(reach)
    if level >= 0:
        return None
    a, b = gain_at_old(left, level), gain_at_old(right, level)
    return None if a is None or b is None else Matched(level, a, b)


def best_setting(scores: Scores, points: list[TradeOff], stat: str) -> tuple[TradeOff, float] | None:
    valued = [(p, v) for p in points if (v := run_averages(scores, p.run)[stat]) is not None]
    return max(valued, key=lambda pv: pv[1]) if valued else None
