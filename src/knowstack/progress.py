"""Progress bars: tqdm on its own, or a row under the study's progress when a study runs (study/progress.py);
without a terminal (a log file, a pipe, a batch job), a line now and then instead of a bar.

Training, pretraining and merging ask `step_bar` for their bar; a study's runner registers a sink while it runs,
so each step's bar appears under the study's own line (rich Progress) instead of as a separate tqdm bar. Where
stderr is not a terminal, tqdm's carriage returns would pile up in the log as one endless line, and rich shows
nothing until the end: there, a step's bar also writes a plain line every LINE_SECONDS and one when it finishes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Protocol, TypeVar

T = TypeVar("T")

# Without a terminal: a line at most this often while a bar runs (a log gains ~120 lines an hour of training).
LINE_SECONDS = 30.0


class Bar(Protocol):
    def __iter__(self) -> Iterator[Any]: ...

    def set_postfix(self, **values: Any) -> None: ...


# (iterable, description) -> a bar; set by the study while it runs its steps in this process
_sink: Callable[[Iterable[Any], str], Bar] | None = None


def set_sink(sink: Callable[[Iterable[Any], str], Bar] | None) -> None:
    global _sink
    _sink = sink


def is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def step_bar(iterable: Iterable[T], desc: str, *, disable: bool = False, unit: str = "it") -> Bar:
    from tqdm import tqdm

    if disable:
        return tqdm(iterable, disable=True)
    terminal = is_terminal(sys.stderr)
    if _sink is not None:
        bar = _sink(iterable, desc)
        return bar if terminal else LineBar(bar, desc, unit=unit, total=_length(iterable))
    if terminal:
        return tqdm(iterable, desc=desc, dynamic_ncols=True, unit=unit)
    return LineBar(iterable, desc, unit=unit)


def _length(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


class LineBar:
    """A bar for a log: 'DESC: 40/100 steps (40%), 01:10, loss=1.234' every `every` seconds and when done; around
    another bar (the study's row) or a plain iterable. stream None: stderr at the time of writing."""

    def __init__(self, iterable: Iterable[Any], desc: str, *, unit: str = "it", total: int | None = None,
                 every: float = LINE_SECONDS, stream: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else _length(iterable)
        self.every, self.stream, self.clock = every, stream, clock
        self.postfix: dict[str, Any] = {}
        self.done = self.shown = 0

    def __iter__(self) -> Iterator[Any]:
        started = last = self.clock()
        for item in self.iterable:
            yield item
            self.done += 1
            now = self.clock()
            if now - last >= self.every:
                self._line(now - started)
                last = now
        if self.shown != self.done:  # the last count, unless the last line said it
            self._line(self.clock() - started)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        inner = getattr(self.iterable, "set_postfix", None)
        if inner is not None:
            inner(**values)

    def _line(self, seconds: float) -> None:
        from tqdm import tqdm

        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        extra = "".join(f", {key}={value}" for key, value in self.postfix.items())
        self.shown = self.done
        stream = self.stream or sys.stderr
        unit = "" if self.unit == "it" else f" {self.unit}s"
        stream.write(f"{self.desc}: {count}{unit}{share}, {tqdm.format_interval(seconds)}{extra}\n")
        stream.flush()
