"""Which method to use: the measured point with the most new knowledge within a limit on old-knowledge loss.

Read from the results only. The candidates are the runs that leave one model holding every task's knowledge,
at every setting measured; the setting decides which methods are open (semi-cooperative: the contributors'
models only; fully cooperative: their data too, so replay and joint training as well).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from knowstack.report.frontier import FULLY_COOPERATIVE, SEMI_COOPERATIVE, TradeOff, left_out
from knowstack.report.runs import Run, run_averages
from knowstack.report.tables import Scores, Table, TableRow
from knowstack.stats import interval_of

SETTING_METHODS = {"semi": SEMI_COOPERATIVE, "full": FULLY_COOPERATIVE}
SETTING_NAME = {"semi": "semi-cooperative", "full": "fully cooperative"}
SETTING_TEXT = {"semi": "semi-cooperative: the contributors share their models, not their data",
                "full": "fully cooperative: the contributors' training data is available too"}
TYPICAL_LIMITS = (1.0, 2.0, 5.0, 10.0)


@dataclass
class Advice:
    max_old_loss: float  # percent of the base's AVE
    setting: str  # semi | full
    best: TradeOff | None
    runner_up: TradeOff | None  # the best point of another method
    candidates: list[TradeOff]

    @property
    def on_gains(self) -> bool:
        """Whether the points are ranked on their AVnew gain from the base (percent points); where the base's
        AVnew is 0 the gains are undefined and the points are ranked on AVnew itself (the same order otherwise)."""
        return all(p.new_gain is not None for p in self.candidates)

    @property
    def margin(self) -> tuple[float, tuple[float, float] | None] | None:
        """How much more new knowledge the first choice gains than the runner-up (AVnew gain, percent points; AVnew
        itself where gains are undefined), with the paired 95% interval of that difference (None without per-item
        scores)."""
        if self.best is None or self.runner_up is None:
            return None
        difference = learned(self.best, self.on_gains) - learned(self.runner_up, self.on_gains)
        return float(difference), interval_of(difference)

    @property
    def distinguishable(self) -> bool | None:
        """Whether the first choice learns more than the runner-up beyond noise: its difference's interval is
        above 0. None where there is no runner-up or no interval."""
        margin = self.margin
        if margin is None or margin[1] is None:
            return None
        return margin[1][0] > 0

    def margin_text(self) -> str:
        margin = self.margin
        if margin is None:
            return "—"
        difference, ci = margin
        number = (lambda v: f"{v:+.1f}") if self.on_gains else (lambda v: f"{v:+.3f}")
        unit = " points" if self.on_gains else " AVnew"
        if ci is None:
            return f"{number(difference)}{unit} (no interval)"
        verdict = "distinguishable" if self.distinguishable else "not distinguishable"
        return f"{verdict}: {number(difference)}{unit} [{number(ci[0])}, {number(ci[1])}]"

    @property
    def least_loss(self) -> TradeOff | None:
        """When nothing meets the limit: the candidate that comes closest (a point whose change is undefined meets
        every limit, so here every candidate has one)."""
        return max(self.candidates, key=lambda p: p.old_change or 0.0, default=None)


def learned(point: TradeOff, on_gains: bool) -> float:
    """What advice ranks a point on: its AVnew gain from the base, or AVnew itself where gains are undefined."""
    value = point.new_gain if on_gains else point.new
    assert value is not None  # trade_offs keeps only points with AVnew
    return value


def within(point: TradeOff, max_old_loss: float) -> bool:
    """Whether the point's AVE falls at most `max_old_loss` percent below the base's. Where that change is
    undefined (the base's AVE is 0) no run can fall below it: the limit cannot bind."""
    return point.old_change is None or point.old_change >= -max_old_loss


def advise(points: list[TradeOff], max_old_loss: float, setting: str) -> Advice:
    """The point with the most new knowledge (AVnew gain; AVnew where the base's is 0) whose old-knowledge AVE
    falls at most `max_old_loss` percent below the base's (of equals, the one with the higher AVE), and the best
    point of a different method (family) as the runner-up."""
    candidates = [p for p in points if p.run.method in SETTING_METHODS[setting]]
    on_gains = all(p.new_gain is not None for p in candidates)
    # equal new knowledge (all 0 on a world the base cannot score): the one that keeps more old knowledge first
    ranked = sorted((p for p in candidates if within(p, max_old_loss)),
                    key=lambda p: (learned(p, on_gains), p.old or 0.0), reverse=True)
    best = ranked[0] if ranked else None
    runner_up = next((p for p in ranked if best is not None and p.family != best.family), None)
    return Advice(max_old_loss, setting, best, runner_up, candidates)


def describe(point: TradeOff, scores: Scores) -> str:
    averages = run_averages(scores, point.run)
    recent = f", recent knowledge (mean BWT) {point.bwt:+.1f}%" if point.bwt is not None else ""
    return (f"{point.run.method_label} ({point.setting}): new knowledge {percent_text(point.new_gain)} (AVnew "
            f"{averages['AVnew']:.3f}), old knowledge {percent_text(point.old_change)} (AVE {averages['AVE']:.3f})"
            f"{recent}, AVall {averages['AVall']:.3f}")


def percent_text(change: float | None) -> str:
    return "n/a" if change is None else f"{change:+.1f}%"


def advice_notes(scores: Scores, runs: list[Run], rounds: int, setting: str | None = None) -> list[str]:
    """What the advice compares and what it leaves out, and why; where gains from the base are undefined, what it
    ranks on instead. The report's advice section and `knowstack advise` say the same."""
    open_to = SETTING_METHODS[setting] if setting else SETTING_METHODS["full"]
    out: dict[str, list[str]] = {}
    for run in runs:
        if run.method == "base":
            continue
        reason = left_out(scores, run, rounds)
        if not reason and run.method == "one-round":
            reason = "a model per task: the upper bound, not one model"
        elif not reason and run.method not in open_to:
            reason = f"not open in the {SETTING_NAME[setting or 'full']} setting"
        if reason:
            out.setdefault(reason, []).append(run.label)
    notes = []
    if out:
        notes.append("Left out: " + "; ".join(f"{', '.join(labels)} ({reason})" for reason, labels in out.items())
                     + ".")
    notes += undefined_gains(scores)
    return notes


def undefined_gains(scores: Scores) -> list[str]:
    """Sentences for averages of the base that are 0 or missing: gains from them are undefined (shown n/a)."""
    base = scores.averages("base")
    notes = []
    if base["AVnew"] == 0:
        notes.append("The base's AVnew is 0, so gains in new knowledge are undefined (n/a): runs are ranked on AVnew "
                     "itself.")
    if base["AVE"] == 0:
        notes.append("The base's AVE is 0, so no run can lose old knowledge: every limit is met.")
    if base["AVnew"] is None or base["AVE"] is None:
        notes.append("The base has no AVnew or AVE: gains and losses from it are undefined (n/a), so the limit "
                     "on old-knowledge loss cannot bind.")
    return notes


def advice_text(advice: Advice, scores: Scores, notes: Sequence[str] = ()) -> str:
    head = f"Within a {advice.max_old_loss:g}% old-knowledge loss ({SETTING_TEXT[advice.setting]}):"
    said = "".join(f"\n  {note}" for note in notes)
    if not advice.candidates:
        return f"{head}\n  no complete run of a {SETTING_NAME[advice.setting]} method in these results.{said}"
    if advice.best is None:
        closest = advice.least_loss
        assert closest is not None
        return (f"{head}\n  no measured point meets the limit. The least loss: {describe(closest, scores)}.\n"
                f"  ({len(advice.candidates)} points measured; a smaller learning rate or fewer steps may meet it.)"
                f"{said}")
    lines = [head, f"  use:       {describe(advice.best, scores)}"]
    if advice.runner_up is not None:
        lines.append(f"  runner-up: {describe(advice.runner_up, scores)}")
        what = "AVnew gain" if advice.on_gains else "AVnew"
        lines.append(f"  first choice vs runner-up, {what}: {advice.margin_text()}")
        if learned(advice.best, advice.on_gains) == learned(advice.runner_up, advice.on_gains):
            lines.append("  (the two learn the same: the first choice keeps more old knowledge)"
                         if advice.best.old != advice.runner_up.old else
                         "  (the two score the same on new and old knowledge: either is as good a choice)")
        elif advice.distinguishable is False:
            lines.append("  (the two are not distinguishable on these test items: either is as good a choice)")
    else:
        lines.append("  runner-up: no point of another method meets the limit")
    lines.append(f"  ({len(advice.candidates)} points of {SETTING_NAME[advice.setting]} methods compared)")
    return "\n".join(lines) + said


def advice_table(points: list[TradeOff]) -> Table:
    """The advice for a few typical limits, both settings: what the report shows."""
    rows = []
    for setting in SETTING_METHODS:
        for limit in TYPICAL_LIMITS:
            advice = advise(points, limit, setting)
            cells = [setting, f"{limit:g}%"]
            for point in (advice.best, advice.runner_up):
                cells += [f"{point.run.method_label} ({point.setting})", point.new, point.new_gain,
                          point.old_change] if point else [NONE_TEXT if advice.candidates else NO_CANDIDATE, None,
                                                           None, None]
            cells.append(advice.margin_text())
            rows.append(TableRow(f"{setting} ≤{limit:g}%", cells, ["text", "text", "text", "score", "percent",
                                                                  "percent", "text", "score", "percent", "percent",
                                                                  "text"], f"{setting}-{limit:g}"))
    header = ["case", "setting", "max old-knowledge loss", "use", "AVnew", "new gain", "old change", "runner-up",
              "AVnew", "new gain", "old change", "use vs runner-up (new gain, 95% interval)"]
    caption = ("Which method to use: for each limit on old-knowledge loss (AVE, % of the base's), the measured "
               "point with the most new knowledge (AVnew gain from base; AVnew itself where the base's AVnew is 0 "
               "and gains are n/a) within it, and the best point of another "
               "method. semi: the contributors share models only (sequential, O-LoRA, merging, MoE); full: their "
               "data too (adds replay and joint training); the last column says whether the first choice learns more than "
               "the runner-up beyond the paired 95% interval. `knowstack advise DIR --max-old-loss 2%` prints it.")
    return Table("advice", caption, header, rows)


NONE_TEXT = "none meets the limit"
NO_CANDIDATE = "no complete run of these methods"
