"""Progress without a terminal (a log file, a pipe, a batch job): a plain line now and then, never tqdm's carriage
returns; with a terminal, tqdm's bar (or the study's row) as before."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_registry import make_finetune
from tqdm import tqdm

from knowstack import progress
from knowstack.cli import main
from knowstack.progress import LineBar, step_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def ticking(step: float) -> Iterator[float]:
    """A clock that moves `step` seconds at each reading."""
    now = 0.0
    while True:
        yield now
        now += step


def test_a_line_every_interval_and_one_at_the_end() -> None:
    out, clock = io.StringIO(), ticking(10.0)
    bar = LineBar(range(10), "train Stance", unit="step", every=30.0, stream=out, clock=lambda: next(clock))
    for item in bar:
        bar.set_postfix(loss=f"{1 / (item + 1):.3f}")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines == ["train Stance: 3/10 steps (30%), 00:30, loss=0.333",
                     "train Stance: 6/10 steps (60%), 01:00, loss=0.167",
                     "train Stance: 9/10 steps (90%), 01:30, loss=0.111",
                     "train Stance: 10/10 steps (100%), 01:50, loss=0.100"]  # its last reading


def test_a_quick_bar_is_one_line_and_an_unsized_one_counts() -> None:
    out = io.StringIO()
    assert list(LineBar(iter("abc"), "merge ties", unit="tensor", stream=out, clock=lambda: 0.0)) == ["a", "b", "c"]
    assert out.getvalue() == "merge ties: 3 tensors, 00:00\n"


def test_step_bar_is_tqdm_on_a_terminal_and_lines_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", Terminal())
    assert isinstance(step_bar(range(3), "train a"), tqdm)
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    bar = step_bar(range(3), "train a", unit="step")
    assert isinstance(bar, LineBar) and list(bar) == [0, 1, 2]
    assert log.getvalue() == "train a: 3/3 steps (100%), 00:00\n"
    assert list(step_bar(range(2), "train b", disable=True)) == [0, 1] and log.getvalue().count("\n") == 1


def test_the_studys_row_is_kept_and_a_log_gets_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    rows: list[str] = []

    def sink(iterable, desc):  # noqa: ANN001, ANN202 - the sink's signature
        rows.append(desc)
        return iter(iterable)

    monkeypatch.setattr(progress, "_sink", sink)
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    assert list(step_bar(range(2), "train a", unit="step")) == [0, 1]
    assert rows == ["train a"] and log.getvalue() == "train a: 2/2 steps (100%), 00:00\n"
    monkeypatch.setattr("sys.stderr", Terminal())
    assert list(step_bar(range(2), "train b")) == [0, 1]
    assert rows == ["train a", "train b"] and log.getvalue().count("\n") == 1  # the terminal has the row only


def test_merge_off_a_terminal_writes_lines_not_carriage_returns(tmp_path: Path, tiny_model_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    models = [make_finetune(tiny_model_dir, tmp_path / f"ft{seed}", seed=seed) for seed in (1, 2)]
    capsys.readouterr()
    assert main(["merge", "--method", "average", "--base", str(tiny_model_dir), "--models", *map(str, models),
                 "--out", str(tmp_path / "merged")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and err.startswith("merge average: ") and "tensors (100%)" in err
