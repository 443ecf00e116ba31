"""`knowstack advise REG`: the method for the next version, from what this registry's composed versions measured.

The same rule as a study's advice (report/advice.py): among the methods open in the setting, the measured
version with the most new knowledge (AVnew gain from the base) whose old-knowledge AVE falls at most the
limit below the base's. Rejected versions count as measurements too: the gate's verdict is about one
release, the trade-off they measured is still information. The setting follows what contributors shared:
semi-cooperative (models; the maintainer may still train sequentially on kept data) unless every
contribution's data is kept, which opens replay and joint training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from knowstack.registry.compose import METHODS
from knowstack.registry.core import Registry, composed
from knowstack.registry.evaluate import new_average, old_average, registered_tasks
from knowstack.stats import Estimate, column_estimate, mean_of
from knowstack.study.methods import CATALOG

SETTING_TEXT = {"semi": "semi-cooperative: merges, MoE, sequential and O-LoRA",
                "full": "fully cooperative: also replay and joint training"}


@dataclass(frozen=True)
class Measured:
    version: str
    method: str
    status: str
    old_change: float  # % of the base's AVE
    new_gain: float  # % of the base's AVnew (points where the base's AVnew is 0)
    ave: float
    avnew: float
    items: dict[str, list[float]] | None = None  # per-item scores kept with the version ("new/<task>": [...])
    base_avnew: float = 0.0


def _percent_change(value: float, reference: float) -> float:
    return 100 * (value - reference) / reference if reference else 100 * (value - reference)


def measured_versions(records: Sequence[dict[str, Any]]) -> list[Measured]:
    tasks = registered_tasks(records)
    base = next(r for r in records if r["kind"] == "base")
    base_ave, base_avnew = old_average(base["scores"]), new_average(base["scores"], tasks)
    out = []
    for record in composed(records):
        ave, avnew = old_average(record["scores"]), new_average(record["scores"], tasks)
        if None in (ave, avnew, base_ave, base_avnew):
            continue  # scored before a task was contributed, or no old-knowledge tasks: not comparable
        out.append(Measured(record["name"], record["method"], record["status"], _percent_change(ave, base_ave),
                            _percent_change(avnew, base_avnew), ave, avnew, record["settings"].get("item_scores"),
                            base_avnew))
    return out


def gain_difference(first: Measured, second: Measured, tasks: list[str]) -> tuple[float, tuple[float, float] | None]:
    """How much more new knowledge (AVnew gain, percent points) `first` measured than `second`, with the paired 95%
    interval over the registered tasks' stored test items where both versions kept their per-item scores."""
    difference = first.new_gain - second.new_gain
    keys = [f"new/{task}" for task in tasks]
    mine, theirs = first.items or {}, second.items or {}
    if not keys or any(k not in mine or k not in theirs or len(mine[k]) != len(theirs[k]) or not mine[k]
                       for k in keys):
        return difference, None
    avnew = (mean_of([column_estimate([mine[k]], k) for k in keys])
             - mean_of([column_estimate([theirs[k]], k) for k in keys]))
    scale = 100 / first.base_avnew if first.base_avnew else 100.0
    ci = avnew.interval if isinstance(avnew, Estimate) else None
    return difference, None if ci is None else (ci[0] * scale, ci[1] * scale)


def open_setting(records: Sequence[dict[str, Any]]) -> str:
    contributions = [r for r in records if r["method"] == "contribution"]
    return "full" if contributions and all(r["keep_data"] for r in contributions) else "semi"


def _line(m: Measured) -> str:
    return (f"{m.method} ({m.version}, {m.status}): new knowledge {m.new_gain:+.1f}% (AVnew {m.avnew:.3f}), "
            f"old knowledge {m.old_change:+.1f}% (AVE {m.ave:.3f})")


def _distinguishable(first: Measured, second: Measured, tasks: list[str]) -> str:
    difference, ci = gain_difference(first, second, tasks)
    if ci is None:
        return f"first choice vs runner-up, AVnew gain: {difference:+.1f} points (no interval: per-item scores not kept)"
    verdict = "distinguishable" if ci[0] > 0 else "not distinguishable on these test items: either is as good a choice"
    return f"first choice vs runner-up, AVnew gain: {difference:+.1f} points [{ci[0]:+.1f}, {ci[1]:+.1f}], {verdict}"


def registry_advice(reg: Registry, max_old_loss: float, setting: str | None = None) -> str:
    records = reg.versions()
    setting = setting or open_setting(records)
    allowed = [m for m in METHODS if setting == "full" or CATALOG[METHODS[m].catalog].setting == "semi"]
    measured = [m for m in measured_versions(records) if m.method in allowed]
    within = sorted((m for m in measured if m.old_change >= -max_old_loss), key=lambda m: m.new_gain, reverse=True)
    lines = [f"Next version, within a {max_old_loss:g}% old-knowledge loss ({SETTING_TEXT[setting]}; "
             f"{len(measured)} composed versions measured):"]
    if within:
        lines.append(f"  use:       {_line(within[0])}")
        other = next((m for m in within if m.method != within[0].method), None)
        lines.append(f"  runner-up: {_line(other)}" if other else "  runner-up: no other method meets the limit")
        if other:
            lines.append(f"  {_distinguishable(within[0], other, list(registered_tasks(records)))}")
    elif measured:
        closest = max(measured, key=lambda m: m.old_change)
        lines.append(f"  no composed version meets the limit. The least loss: {_line(closest)}")
    else:
        lines.append("  nothing measured yet: compose a version (knowstack compose) first")
    untried = [m for m in allowed if m not in {v.method for v in measured}]
    if untried:
        lines.append(f"  not yet measured here: {', '.join(untried)}")
    return "\n".join(lines)
