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

FULLY_COOPERATIVE_ONLY = ("replay", "joint")
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
                            _percent_change(avnew, base_avnew), ave, avnew))
    return out


def open_setting(records: Sequence[dict[str, Any]]) -> str:
    contributions = [r for r in records if r["method"] == "contribution"]
    return "full" if contributions and all(r["keep_data"] for r in contributions) else "semi"


def _line(m: Measured) -> str:
    return (f"{m.method} ({m.version}, {m.status}): new knowledge {m.new_gain:+.1f}% (AVnew {m.avnew:.3f}), "
            f"old knowledge {m.old_change:+.1f}% (AVE {m.ave:.3f})")


def registry_advice(reg: Registry, max_old_loss: float, setting: str | None = None) -> str:
    records = reg.versions()
    setting = setting or open_setting(records)
    allowed = [m for m in METHODS if setting == "full" or m not in FULLY_COOPERATIVE_ONLY]
    measured = [m for m in measured_versions(records) if m.method in allowed]
    within = sorted((m for m in measured if m.old_change >= -max_old_loss), key=lambda m: m.new_gain, reverse=True)
    lines = [f"Next version, within a {max_old_loss:g}% old-knowledge loss ({SETTING_TEXT[setting]}; "
             f"{len(measured)} composed versions measured):"]
    if within:
        lines.append(f"  use:       {_line(within[0])}")
        other = next((m for m in within if m.method != within[0].method), None)
        lines.append(f"  runner-up: {_line(other)}" if other else "  runner-up: no other method meets the limit")
    elif measured:
        closest = max(measured, key=lambda m: m.old_change)
        lines.append(f"  no composed version meets the limit. The least loss: {_line(closest)}")
    else:
        lines.append("  nothing measured yet: compose a version (knowstack compose) first")
    untried = [m for m in allowed if m not in {v.method for v in measured}]
    if untried:
        lines.append(f"  not yet measured here: {', '.join(untried)}")
    return "\n".join(lines)
