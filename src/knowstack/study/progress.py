"""The study's own progress on the console: step N of M, time elapsed, and an estimate of the time left, with
the running step's bar (its training steps) under it, in one rich Progress display.

The time left comes from the dry run's per-step estimates (study/resources.py estimate_step): each step's size
is the number of parameters it works on (its Estimate.params), and the seconds per parameter of each kind of
step (train, eval, merge, ...) are measured on the steps this run has finished; a kind not measured yet takes
the mean rate of those that are. Until a step has finished, there is no estimate. Steps already done before
this run count as done and cost nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from knowstack import progress as bars
from knowstack.study.plan import Step


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class TimeLeft:
    """Seconds per parameter, per kind of step, from the steps finished; the remaining steps' sum."""

    def __init__(self, sizes: dict[str, float]):
        self.sizes = sizes  # step key -> parameters it works on (1 where unknown)
        self.measured: dict[str, list[tuple[float, float]]] = {}  # kind -> [(seconds, size)]

    def record(self, step: Step, seconds: float) -> None:
        self.measured.setdefault(step.kind, []).append((seconds, self.sizes.get(step.key, 1.0)))

    def rate(self, kind: str) -> float | None:
        runs = self.measured.get(kind) or [run for runs in self.measured.values() for run in runs]
        size = sum(s for _, s in runs)
        return sum(t for t, _ in runs) / size if runs and size else None

    def left(self, remaining: Sequence[Step]) -> float | None:
        total = 0.0
        for step in remaining:
            rate = self.rate(step.kind)
            if rate is None:
                return None
            total += rate * self.sizes.get(step.key, 1.0)
        return total


class StudyProgress:
    """`with StudyProgress(steps, console, sizes) as progress:` then start(step) / finish(step) / skip(step)."""

    def __init__(self, steps: Sequence[Step], console: Console, sizes: dict[str, float] | None = None,
                 jobs: int = 1, total: int | None = None):
        self.steps = list(steps)
        # the study's steps where these are a part of them (the world, built first): "step 1/38 world"
        self.total = max(total or 0, len(self.steps))
        self.jobs = jobs  # steps at once: the time left is the remaining steps' sum over them (an approximation)
        self.console = console
        self.time_left = TimeLeft(sizes or {})
        self.done: set[str] = set()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[left]}"), console=console)
        self.study: TaskID | None = None
        self.current: dict[str, TaskID] = {}  # the running steps' rows (several where steps run side by side)
        self.side_by_side = False  # steps have run at once: each line names its step
        self.started_at: dict[str, float] = {}

    def __enter__(self) -> StudyProgress:
        self.progress.start()
        self.study = self.progress.add_task("study", total=self.total, left="")
        bars.set_sink(self._bar)
        return self

    def __exit__(self, *exc: object) -> None:
        bars.set_sink(None)
        self.progress.stop()

    def skip(self, step: Step) -> None:
        self.done.add(step.key)
        self._update()

    def start(self, step: Step, index: int) -> None:
        self.started_at[step.key] = time.monotonic()
        self.side_by_side = self.side_by_side or bool(self.current)
        self.console.print(f"[bold]step {index}/{self.total}[/bold] {step.kind}: {escape(step.shown)}", soft_wrap=True)
        self.current[step.key] = self.progress.add_task(f"  {step.kind} {escape(step.shown)}", total=None, left="")
        self._update()

    def finish(self, step: Step) -> float:
        seconds = time.monotonic() - self.started_at.pop(step.key)
        self.time_left.record(step, seconds)
        self.done.add(step.key)
        if step.key in self.current:
            self.progress.remove_task(self.current.pop(step.key))
        # beside other steps, "done" must say which
        who = f" {step.kind}: {escape(step.shown)}" if self.side_by_side else ""
        self.console.print(f"  done{who} in {seconds:.1f} s", soft_wrap=True)
        self._update()
        return seconds

    def _update(self) -> None:
        remaining = [s for s in self.steps if s.key not in self.done]
        left = self.time_left.left(remaining)
        left = None if left is None else left / max(1, min(self.jobs, len(remaining)))
        text = "" if not remaining else "left: estimating" if left is None else f"left: ~{format_seconds(left)}"
        assert self.study is not None
        self.progress.update(self.study, completed=len(self.done), left=text,
                             description=f"study: step {min(len(self.done) + 1, self.total)} of {self.total}")

    def _bar(self, iterable: Iterable[Any], desc: str) -> _RichBar:
        return _RichBar(self.progress, iterable, desc)


class _RichBar:
    """A step's own bar (its optimizer steps) as a row under the study's, with tqdm's set_postfix."""

    def __init__(self, progress: Progress, iterable: Iterable[Any], desc: str):
        self.progress, self.items = progress, list(iterable)
        self.desc = desc
        self.task = progress.add_task(f"    {desc}", total=len(self.items), left="")

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.items:
                yield item
                self.progress.advance(self.task)
        finally:
            self.progress.remove_task(self.task)

    def set_postfix(self, **values: Any) -> None:
        self.progress.update(self.task, left=" ".join(f"{k}={v}" for k, v in values.items()))


def step_sizes(steps: Sequence[Step], estimates: dict[str, Any]) -> dict[str, float]:
    """Each step's size for the time-left estimate: the parameters its estimate says it works on."""
    return {step.key: float(getattr(estimates.get(step.key), "params", 0) or 1) for step in steps}
