"""Runs a study's plan: skips finished steps, resumes cut-off ones, then writes results and report."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from knowstack.atomic import atomic_write_json, atomic_write_text
from knowstack.config import StudyConfig
from knowstack.errors import KnowstackError
from knowstack.study.plan import Plan, build_plan
from knowstack.study.results import collect_rows, olora_penalties, write_csv, write_sqlite
from knowstack.study.steps import StudyContext, execute


@dataclass
class StudyOutcome:
    out: Path
    results_csv: Path
    report: Path
    steps_run: int
    steps_skipped: int


@contextlib.contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """One runner per study dir: a second one would race on the same artifacts."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KnowstackError("another knowstack process is running this study", path=out) from None
        yield


def context_for(plan: Plan, out: Path) -> StudyContext:
    world = next((step.key for step in plan.ordered() if step.kind == "world"), None)
    return StudyContext(out=out, config=plan.config, world_key=world)


def describe_plan(plan: Plan, out: Path, console: Console) -> None:
    table = Table(title=f"plan of study '{plan.config.name}' in {out}")
    for column in ("#", "step", "kind", "status"):
        table.add_column(column)
    for index, step in enumerate(plan.ordered(), start=1):
        done = (out / "artifacts" / step.key).is_dir()
        table.add_row(str(index), step.key, step.kind, "[green]done[/green]" if done else "to do")
    console.print(table)
    done = sum((out / "artifacts" / s.key).is_dir() for s in plan.ordered())
    console.print(f"{len(plan.steps)} steps, {done} done, {len(plan.evaluations)} models evaluated")


def write_outputs(plan: Plan, out: Path) -> tuple[Path, Path]:
    from knowstack.report.markdown import write_report

    rows = collect_rows(plan, out / "artifacts")
    write_csv(rows, out / "results.csv")
    write_sqlite(rows, out / "results.sqlite")
    report = write_report(
        rows, out, title=plan.config.name, task_order=plan.task_names, old_metric=plan.config.old_knowledge.metric,
        penalties=olora_penalties(plan, out / "artifacts"),
    )
    return out / "results.csv", report


def run_study(config: StudyConfig, out: Path, *, dry_run: bool = False, console: Console | None = None,
              config_text: str | None = None) -> StudyOutcome | None:
    console = console or Console(stderr=True)
    out = Path(out)
    plan = build_plan(config)
    if dry_run:
        describe_plan(plan, out, console)
        return None
    with study_lock(out):
        if config_text is not None:
            atomic_write_text(out / "config.yaml", config_text)
        atomic_write_json(out / "plan.json", [{"key": s.key, "kind": s.kind, "deps": s.deps} for s in plan.ordered()])
        ctx = context_for(plan, out)
        steps = plan.ordered()
        ran = skipped = 0
        started = time.monotonic()
        for index, step in enumerate(steps, start=1):
            if ctx.artifact(step.key).is_dir():
                skipped += 1
                continue
            console.print(f"[bold]step {index}/{len(steps)}[/bold] {step.kind}: {step.label}")
            t0 = time.monotonic()
            execute(step, ctx)
            ran += 1
            console.print(f"  done in {time.monotonic() - t0:.1f} s")
        results, report = write_outputs(plan, out)
        console.print(
            f"study '{config.name}': {ran} steps run, {skipped} already done, "
            f"{time.monotonic() - started:.0f} s"
        )
    return StudyOutcome(out, results, report, ran, skipped)
