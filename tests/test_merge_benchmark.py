"""benchmarks/merge.py's own parts: the ratio summary (median and range of the per-repeat ratios), the page-cache
measurement, the row it prints and the alternation of the two tools' runs (without mergekit: stand-in commands)."""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path

import pytest
from conftest import load_script

BENCH = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "merge.py", "merge_benchmark_helpers")


def test_ratio_summary_is_the_median_and_range_of_the_per_repeat_ratios() -> None:
    summary = BENCH.ratio_summary([10.0, 30.0, 12.0], [20.0, 20.0, 10.0])  # ratios 0.5, 1.5, 1.2
    assert summary == {"median": 1.2, "min": 0.5, "max": 1.5, "n": 3}
    # not the ratio of the medians (12 / 20) nor of the bests (10 / 10)
    assert BENCH.ratio_summary([4.0, 1.0], [2.0, 4.0])["median"] == pytest.approx((2.0 + 0.25) / 2)
    with pytest.raises(ValueError, match="one of each per repeat"):
        BENCH.ratio_summary([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        BENCH.ratio_summary([], [])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux fincore is not installed here")
def test_page_cache_share_of_a_file_just_read(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x" * 100_000)
    (model / "model.safetensors").read_bytes()
    share = BENCH.page_cache_share([model])
    assert share is not None and 0.99 <= share <= 1.0


def test_page_cache_share_without_files_or_fincore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert BENCH.page_cache_share([tmp_path]) is None  # no safetensors
    (tmp_path / "model.safetensors").write_bytes(b"x")
    monkeypatch.setattr(BENCH.shutil, "which", lambda name: None)
    assert BENCH.page_cache_share([tmp_path]) is None


def test_runs_alternate_which_tool_goes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []

    def fake_timed(command: list[str], inputs: list[Path]) -> object:
        order.append(command[0])
        out = Path(command[command.index("--out") + 1]) if "--out" in command else Path(command[2])
        out.mkdir()
        return BENCH.Run(wall_s=2.0 if command[0] == "ks" else 4.0, cpu_s=1.0, peak_rss=100, inputs_cached=1.0,
                         load1=0.5)

    monkeypatch.setattr(BENCH, "timed", fake_timed)
    monkeypatch.setattr(BENCH, "compare", lambda ours, theirs: (0.0, 0, 1000))
    result = BENCH.compare_method("average", ["ks", "merge"], ["mk", "cfg.yml"], [], tmp_path, 3, checkpoint=50)
    assert order == ["ks", "mk", "mk", "ks", "ks", "mk"]
    assert result["ratio"] == {"median": 0.5, "min": 0.5, "max": 0.5, "n": 3}
    assert result["knowstack"]["peak_rss_per_checkpoint"] == 2.0
    assert result["mergekit_method"] == "linear" and result["repeats"] == 3
    row = BENCH.format_row(result)
    assert "0.50x [0.50-0.50]" in row and "100%" in row


def test_a_childs_peak_memory_is_its_own_not_the_parents() -> None:
    """rusage would report this process's high-water mark for any child it spawns (Linux carries it over at exec)."""
    held = bytearray(400 * 2**20)  # this process grows by 400 MB
    held[:: 4096] = b"x" * len(held[:: 4096])
    child = "import time\nx = bytearray(60 * 2**20)\nx[::4096] = b'x' * len(x[::4096])\ntime.sleep(0.2)"
    run = BENCH.timed([sys.executable, "-c", child], [])
    assert 60 * 2**20 <= run.peak_rss < 300 * 2**20
    del held


def test_a_child_that_writes_more_than_a_pipe_holds_is_not_stuck() -> None:
    """A long merge's progress bar on stderr must not fill a pipe that nobody reads while the child is waited for."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            BENCH.timed([sys.executable, "-c", "import sys\nsys.stderr.write('.' * 200_000 + 'boom')\nsys.exit(3)"], [])
        except SystemExit as failed:
            outcome.append(failed)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the child blocked on its stderr"
    assert outcome and str(outcome[0]).endswith("boom")  # the failed command's stderr ends the error
