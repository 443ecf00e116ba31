"""Progress bars: tqdm on its own, or a row under the study's progress when a study runs (study/progress.py).

Training and pretraining ask `step_bar` for their bar; a study's runner registers a sink while it runs, so
each step's bar appears under the study's own line (rich Progress) instead of as a separate tqdm bar.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Bar(Protocol):
    def __iter__(self) -> Iterator[Any]: ...

    def set_postfix(self, **values: Any) -> None: ...


# (iterable, description) -> a bar; set by the study while it runs its steps in this process
_sink: Callable[[Iterable[Any], str], Bar] | None = None


def set_sink(sink: Callable[[Iterable[Any], str], Bar] | None) -> None:
    global _sink
    _sink = sink


def step_bar(iterable: Iterable[T], desc: str, *, disable: bool = False, unit: str = "it") -> Bar:
    if _sink is not None and not disable:
        return _sink(iterable, desc)
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, disable=disable, dynamic_ncols=True, unit=unit)
