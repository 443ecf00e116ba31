"""benchmarks/compute_floor.py's own parts: which steps it samples, how it counts kernel time and the floor it
derives (the profiling runs are the benchmark's, not the tests')."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compute_floor.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(SCRIPT)


def test_samples_are_the_steps_nearest_the_median_cost(bench: ModuleType) -> None:
    steps = [(9.0, "e"), (1.0, "a"), (5.0, "c"), (3.0, "b"), (7.0, "d")]
    assert bench.median_keys(steps, 1) == ["c"]
    assert bench.median_keys(steps, 3) == ["b", "c", "d"]
    assert bench.median_keys(steps, 9) == ["a", "b", "c", "d", "e"]


def test_kernel_time_counts_matmuls_and_attention_only(bench: ModuleType) -> None:
    events = [SimpleNamespace(key="aten::mm", self_cpu_time_total=2e6, flops=4e11),
              SimpleNamespace(key="aten::_scaled_dot_product_flash_attention_for_cpu", self_cpu_time_total=1e6, flops=0),
              SimpleNamespace(key="aten::mul", self_cpu_time_total=5e6, flops=1e9)]
    assert bench.kernel_profile(events) == (3.0, 2.0, 400.0)


def test_the_profile_of_a_matmul_is_mostly_kernel(bench: ModuleType) -> None:
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    measured = bench.profiled(lambda: [a @ b for _ in range(20)])
    assert measured["kernel_share"] > 0.5 and measured["matmul_gflops"] > 0
    idle = bench.profiled(lambda: sum(range(200_000)))
    assert idle["kernel_share"] == 0.0


def test_floor_weighs_each_kind_by_its_recorded_seconds(bench: ModuleType, tmp_path: Path) -> None:
    kinds = {"world": {"seconds": 100.0, "kernel_share": 0.8}, "eval": {"seconds": 100.0, "kernel_share": 0.3}}
    assert bench.floor(kinds) == (110.0, 200.0)
    for key, kind, seconds in (("a", "train", 4.0), ("b", "train", 6.0), ("c", "eval", 1.5)):
        (tmp_path / "artifacts" / key).mkdir(parents=True)
        (tmp_path / "artifacts" / key / "step.json").write_text(json.dumps({"key": key, "kind": kind,
                                                                            "cost": {"seconds": seconds}}))
    assert bench.recorded_seconds(tmp_path) == {"train": [(4.0, "a"), (6.0, "b")], "eval": [(1.5, "c")]}
    assert bench.main(["--study", str(tmp_path / "nowhere")]) == 2
