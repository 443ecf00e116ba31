"""Cost of a run: what knowstack.usage measures, costs.csv's round trip, and the report's cost table from
per-model costs (one-round runs summed, staged runs at their last stage, seeds averaged), saying "not measured"
where a study's artifacts predate cost records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from knowstack.report.build import build_report
from knowstack.report.tables import Table
from knowstack.results import Cost, Row, read_costs_csv, write_costs_csv
from knowstack.usage import Usage, dir_bytes

MIB = 2**20


def rows() -> list[Row]:
    def of(model: str, method: str, finetune: str, stage: int | None, trained_on: str) -> list[Row]:
        return [Row(model, method, finetune, stage, "a", "new", "accuracy", 0.5, 10, trained_on),
                Row(model, method, finetune, stage, "b", "new", "accuracy", 0.5, 10, trained_on)]

    return (of("base", "base", "", None, "") + of("one-round-lora-a", "one-round", "lora", None, "a")
            + of("one-round-lora-b", "one-round", "lora", None, "b")
            + of("sequential-lora-1", "sequential", "lora", 1, "a")
            + of("sequential-lora-2", "sequential", "lora", 2, "b"))


def cost(model: str, steps: int, seconds: float, examples: int, host: int, disk: int, *, seed: int | None = None,
         gpu: int | None = None, scope: str = "step") -> Cost:
    return Cost(model, "", "", None, "", seed, "", steps, seconds / 2, seconds, examples, host, scope, gpu, disk)


def cost_table(costs: list[Cost]) -> Table:
    sections = build_report(rows(), title="t", task_order=["a", "b"], costs=costs)
    return next(b for s in sections for b in s.walk() if isinstance(b, Table) and b.key == "cost")


def test_the_cost_table_sums_one_round_models_and_takes_a_staged_runs_last_stage() -> None:
    costs = [cost("one-round-lora-a", 1, 10.0, 100, 300 * MIB, 2 * MIB),
             cost("one-round-lora-b", 1, 20.0, 50, 400 * MIB, 2 * MIB),
             cost("sequential-lora-1", 2, 12.0, 100, 500 * MIB, 8 * MIB),
             # two seeds of the last stage: sums are their mean, peaks the largest
             cost("sequential-lora-2", 4, 30.0, 150, 600 * MIB, 8 * MIB, seed=0, gpu=100 * MIB),
             cost("sequential-lora-2", 4, 50.0, 150, 700 * MIB, 8 * MIB, seed=1, gpu=200 * MIB, scope="process")]
    table = cost_table(costs)
    assert table.header[2:] == ["steps", "train seconds", "wall seconds", "examples seen", "peak host memory (MiB)",
                                "peak GPU memory (MiB)", "disk (MiB)"]
    one_round = table.row("one-round LoRA")
    assert one_round.cells[1:] == [2, 15.0, 30.0, 150, 400.0, "no GPU", 4.0]
    sequential = table.row("sequential LoRA")
    assert sequential.cells[1:] == [4, 20.0, 40.0, 150, "≤ 700.0", 200.0, 8.0]
    assert table.row("base") is None


def test_without_cost_records_the_report_says_not_measured() -> None:
    table = cost_table([])
    assert [r.label for r in table.rows] == ["one-round LoRA", "sequential LoRA"]
    assert all(cell == "not measured" for r in table.rows for cell in r.cells[1:])
    # a record from an older knowstack: its training seconds and examples, but no wall time or memory
    old = Cost("sequential-lora-2", "", "", None, "", None, "", 4, 7.5, None, 150, None, "", None, 8 * MIB)
    cells = cost_table([old]).row("sequential LoRA").cells[1:]
    assert cells == [4, 7.5, "not measured", 150, "not measured", "not measured", 8.0]


def test_costs_csv_round_trip(tmp_path: Path) -> None:
    costs = [Cost("sequential-lora-2", "sequential", "lora", 2, "b", None, "", 4, 7.25, 9.5, 150, 123456789, "step",
                  None, 4096),
             Cost("base", "base", "", None, "", 1, "lr=0.1", 0, None, None, None, None, "", None, None)]
    write_costs_csv(costs, tmp_path / "costs.csv")
    assert read_costs_csv(tmp_path / "costs.csv") == costs
    assert read_costs_csv(tmp_path / "absent.csv") == []


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak reset needs Linux's /proc")
def test_usage_measures_each_blocks_own_peak_host_memory() -> None:
    with Usage() as big:
        block = bytearray(200 * MIB)
        block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page: resident
        del block
    with Usage() as small:
        pass
    assert big.record()["peak_host_scope"] == "step"
    assert big.record()["peak_host_bytes"] >= 200 * MIB
    assert small.record()["peak_host_bytes"] < big.record()["peak_host_bytes"] - 150 * MIB
    assert big.record()["peak_gpu_bytes"] is None and big.record()["seconds"] >= 0


def test_dir_bytes_counts_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 5)
    assert dir_bytes(tmp_path) == 15 and dir_bytes(tmp_path / "a.bin") == 10


def test_usage_reads_torchs_gpu_peak_where_a_gpu_was_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: a stand-in torch.cuda checks the wiring (reset at the start, max_memory_allocated at the end);
    a CPU process, which never initialised CUDA, reports none."""
    calls: list[str] = []

    class Cuda:
        @staticmethod
        def is_available() -> bool:
            return True

        @staticmethod
        def is_initialized() -> bool:
            return True

        @staticmethod
        def reset_peak_memory_stats() -> None:
            calls.append("reset")

        @staticmethod
        def max_memory_allocated() -> int:
            calls.append("peak")
            return 123 * MIB

    class Torch:
        cuda = Cuda

    monkeypatch.setitem(sys.modules, "torch", Torch)
    with Usage() as usage:
        pass
    assert usage.record()["peak_gpu_bytes"] == 123 * MIB and calls == ["reset", "peak"]
    monkeypatch.setattr(Cuda, "is_initialized", staticmethod(lambda: False))
    with Usage() as cpu:
        pass
    assert cpu.record()["peak_gpu_bytes"] is None
