"""Which method to use: the measured point with the most new knowledge within a limit on old-knowledge loss.

Read from the results only. The candidates are the runs that leave one model holding every task's knowledge,
at every setting measured; the setting decides which methods are open (semi-cooperative: the contributors'
models only; fully cooperative: their data too, so replay and joint training as well).
"""

from __future__ import annotations

from dataclasses import dataclass

from knowstack.report.frontier import FULLY_COOPERATIVE, SEMI_COOPERATIVE, TradeOff
from knowstack.report.runs import run_averages
from knowstack.report.tables import Scores, Table, TableRow
from knowstack.stats import interval_of

SETTING_METHODS = {"semi": SEMI_COOPERATIVE, "full": FULLY_COOPERATIVE}
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
    def margin(self) -> tuple[float, tuple[float, float] | None] | None:
        """How much more new knowledge the first choice gains than the runner-up (AVnew gain, percent points),
        with the paired 95% interval of that difference (None without per-item scores)."""
        if self.best is None or self.runner_up is None:
            return None
        difference = self.best.new_gain - self.runner_up.new_gain
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
        if ci is None:
            return f"{difference:+.1f} points (no interval)"
        verdict = "distinguishable" if self.distinguishable else "not distinguishable"
        return f"{verdict}: {difference:+.1f} points [{ci[0]:+.1f}, {ci[1]:+.1f}]"

    @property
    def least_loss(self) -> TradeOff | None:
        """When nothing meets the limit: the candidate that comes closest."""
        return max(self.candidates, key=lambda p: p.old_change, default=None)


def advise(points: list[TradeOff], max_old_loss: float, setting: str) -> Advice:
    """The point with the most new knowledge (AVnew gain) whose old-knowledge AVE falls at most `max_old_loss`
    percent below the base's, and the best point of a different method (family) as the runner-up."""
    candidates = [p for p in points if p.run.method in SETTING_METHODS[setting]]
    within = sorted((p for p in candidates if p.old_change >= -max_old_loss), key=lambda p: p.new_gain, reverse=True)
    best = within[0] if within else None
    runner_up = next((p for p in within if best is not None and p.family != best.family), None)
    return Advice(max_old_loss, setting, best, runner_up, candidates)


def describe(point: TradeOff, scores: Scores) -> str:
    averages = run_averages(scores, point.run)
    recent = f", recent knowledge (mean BWT) {point.bwt:+.1f}%" if point.bwt is not None else ""
    return (f"{point.run.method_label} ({point.setting}): new knowledge {point.new_gain:+.1f}% (AVnew {averages['AVnew']:.3f}), "
            f"old knowledge {point.old_change:+.1f}% (AVE {averages['AVE']:.3f}){recent}, AVall {averages['AVall']:.3f}")


def advice_text(advice: Advice, scores: Scores) -> str:
    head = f"Within a {advice.max_old_loss:g}% old-knowledge loss ({SETTING_TEXT[advice.setting]}):"
    if not advice.candidates:
        return f"{head}\n  no measured run of a {advice.setting}-cooperative method in these results."
    if advice.best is None:
        closest = advice.least_loss
        assert closest is not None
        return (f"{head}\n  no measured point meets the limit. The least loss: {describe(closest, scores)}.\n"
                f"  ({len(advice.candidates)} points measured; a smaller learning rate or fewer steps may meet it.)")
    lines = [head, f"  use:       {describe(advice.best, scores)}"]
    if advice.runner_up is not None:
        lines.append(f"  runner-up: {describe(advice.runner_up, scores)}")
        lines.append(f"  first choice vs runner-up, AVnew gain: {advice.margin_text()}")
        if advice.distinguishable is False:
            lines.append("  (the two are not distinguishable on these test items: either is as good a choice)")
    else:
        lines.append("  runner-up: no point of another method meets the limit")
    return "\n".join(lines)


def advice_table(points: list[TradeOff]) -> Table:
    """The advice for a few typical limits, both settings: what the report shows."""
    rows = []
    for setting in SETTING_METHODS:
        for limit in TYPICAL_LIMITS:
            advice = advise(points, limit, setting)
            cells = [setting, f"{limit:g}%"]
            for point in (advice.best, advice.runner_up):
                cells += [f"{point.run.method_label} ({point.setting})", point.new_gain, point.old_change] if point else \
                    ["none meets the limit", None, None]
            cells.append(advice.margin_text())
            rows.append(TableRow(f"{setting} ≤{limit:g}%", cells, ["text", "text", "text", "percent", "percent",
                                                                  "text", "percent", "percent", "text"],
                                 f"{setting}-{limit:g}"))
    header = ["case", "setting", "max old-knowledge loss", "use", "new gain", "old change", "runner-up",
              "new gain", "old change", "use vs runner-up (new gain, 95% interval)"]
    caption = ("Which method to use: for each limit on old-knowledge loss (AVE, % of the base's), the measured "
               "point with the most new knowledge (AVnew gain from base) within it, and the best point of another "
               "method. semi: the contributors share models only (sequential, O-LoRA, merging, MoE); full: their "
               "data too (adds replay and joint training); the last column says whether the first choice learns more than "
               "the runner-up beyond the paired 95% interval. `knowstack advise DIR --max-old-loss 2%` prints it.")
    return Table("advice", caption, header, rows)
