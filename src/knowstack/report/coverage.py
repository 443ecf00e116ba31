"""What a study has and what it lacks: runs still going, methods planned but not evaluated yet, and the
paper's methods that the study's config does not include. A partial study reports what it has."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

from knowstack.report.runs import Run, find_runs, stages_done
from knowstack.report.tables import Scores, Table, TableRow
from knowstack.results import Row

# The paper's runs, as run-key patterns, with the name the report gives each.
PAPER_RUNS: tuple[tuple[str, str], ...] = (
    ("one-round/fft", "one-round FFT"), ("one-round/lora", "one-round LoRA"),
    ("sequential/fft", "sequential FFT"), ("sequential/lora", "sequential LoRA"),
    ("olora/*", "O-LoRA (the paper: λ=0.5 and λ=5)"),
    ("merge/fft/average", "FFT merge (average)"), ("merge/lora/*average", "LoRA merge (average)"),
    ("merge/*/ties", "TIES merge"), ("merge/*/ties-dare", "TIES-DARE merge"),
    ("moe/fft*", "FFT-MoE"), ("moe/lora*", "LoRA-MoE"),
    ("replay/fft", "sequential FFT with replay"), ("replay/lora", "sequential LoRA with replay"),
    ("joint/fft", "joint FFT"), ("joint/lora", "joint LoRA"),
)


@dataclass
class Coverage:
    table: Table
    unfinished: list[str]  # planned runs with models not evaluated yet
    absent: list[str]  # the paper's runs neither in the results nor in the plan

    @property
    def complete(self) -> bool:
        return not self.unfinished and not self.absent


def planned_runs(planned: list[Row] | None, task_order: list[str]) -> list[Run]:
    """The plan's evaluations grouped into runs the same way as the results."""
    if not planned:
        return []
    return find_runs(Scores.from_rows(planned, task_order))


def coverage(runs: list[Run], planned: list[Row] | None, task_order: list[str]) -> Coverage:
    """One row per run in the results or the plan, with how many of its models have results."""
    plan = {r.key: r for r in planned_runs(planned, task_order)}
    have = {r.key: r for r in runs}
    rows, unfinished = [], []
    for key in [*have, *(k for k in plan if k not in have)]:
        run = have.get(key) or plan[key]
        done = {m.model for m in have[key].models} if key in have else set()
        expected = [m.model for m in plan[key].models] if key in plan else sorted(done)
        missing = [m for m in expected if m not in done]
        status = _status(have.get(key), missing, len(task_order), bool(plan))
        if missing:
            unfinished.append(f"{run.label} ({len(missing)} of {len(expected)} models to go)")
        rows.append(TableRow(run.label, [run.setting, key, f"{len(done)} of {max(len(expected), len(done))}",
                                         status], unit="text", key=key))
    absent = [name for pattern, name in PAPER_RUNS
              if not any(fnmatch(k, pattern) for k in [*have, *plan])]
    rows += [TableRow(name, ["", pattern, "0", "not in this study"], unit="text", key=pattern)
             for pattern, name in PAPER_RUNS if name in absent]
    header = ["run", "setting", "key", "models with results", "status"]
    caption = ("Every run of the study and of the paper, and how much of it has results. A run in progress shows "
               "what it has so far; the paper's methods absent from this study's config are not measured.")
    return Coverage(Table("coverage", caption, header, rows), unfinished, absent)


def _status(run: Run | None, missing: list[str], rounds: int, have_plan: bool) -> str:
    if run is None:
        return "planned, no results yet"
    if missing:
        return "partial: no results for " + ", ".join(missing)
    partial = stages_done(run, rounds)
    if partial and not have_plan:
        return f"partial: {partial}"
    return "complete"
