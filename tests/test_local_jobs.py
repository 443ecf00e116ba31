"""The local executor with steps side by side (executor.jobs): the same artifacts and results as one step at a time,
a step too large to share the machine alone, and a killed study (its workers with it) resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_study import tiny_study

from knowstack.cli import main
from knowstack.config import load_config
from knowstack.errors import KnowstackError
from knowstack.kernels import kernel_path, sums_independent_of_threads
from knowstack.study.executors import make_executor, resolve_jobs, threads_per_step, waiting_threads_sleep
from knowstack.study.plan import Step
from knowstack.study.resources import Estimate, shares_cores

TASKS = ["stance", "math"]
# Each study computes its own steps: linked from another's (the shared step cache), they would be its files.
OWN_STEPS = ["--no-shared-cache"]


def _config(tmp: Path) -> Path:
    return tiny_study(tmp, {"one-round": {"finetune": ["lora", "fft"]}}, tasks=TASKS)


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("jobs1")
    config = _config(tmp)
    assert main(["study", str(config), "--out", str(tmp / "run"), "--jobs", "1", *OWN_STEPS]) == 0
    return config, tmp / "run"


def _made_files(out: Path) -> dict[str, bytes]:
    """Every file the steps made (weights, adapters, scores, predictions), but their records of time and memory;
    the study dir's path (in model cards and adapter configs, naming the base) as <out>."""
    return {p.relative_to(out).as_posix(): _content(p).replace(str(out).encode(), b"<out>")
            for p in sorted((out / "artifacts").rglob("*"))
            if p.is_file() and p.name not in ("step.json", "train_summary.json", "world.json")}


def _content(path: Path) -> bytes:
    """A file's bytes; PEFT writes an adapter's target_modules from a set, in an order that varies between
    processes (string hashing): sorted here."""
    if path.name != "adapter_config.json":
        return path.read_bytes()
    config = json.loads(path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    return json.dumps(config, sort_keys=True).encode()


def test_steps_side_by_side_make_the_same_files_and_results(one_at_a_time: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """2 steps at once on 1 thread each: the same bytes as 1 step at a time on every core, where MKL's strict mode
    makes sums independent of the thread count (knowstack's default, kernels.py; measured in docs/builtin-world.md);
    with another MKL_CBWR the same files and rows, their values may differ."""
    config, reference = one_at_a_time
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["study", str(config), "--out", str(out), "--jobs", "2", *OWN_STEPS]) == 0
    err = capsys.readouterr().err
    assert "done train: " in err  # lines name their step once steps ran side by side
    made, expected = _made_files(out), _made_files(reference)
    assert made.keys() == expected.keys() and any(k.endswith(".safetensors") for k in made)
    worlds = [json.loads(p.read_text()) for p in (out / "artifacts").glob("*/world.json")]
    assert worlds and worlds[0]["environment"]["torch_threads"] == resolve_jobs("auto")
    assert worlds[0]["environment"]["mkl_cbwr"] == kernel_path()["mkl_cbwr"]
    if not sums_independent_of_threads():
        rows = [(out / "results.csv").read_text().splitlines(), (reference / "results.csv").read_text().splitlines()]
        assert len(rows[0]) == len(rows[1]) and rows[0][0] == rows[1][0]
        return
    for name in ("results.csv", "per_example.jsonl"):
        assert (out / name).read_text() == (reference / name).read_text()
    assert [k for k in made if made[k] != expected[k]] == []


@pytest.mark.slow
def test_a_killed_study_stops_its_workers_and_resumes(one_at_a_time: tuple[Path, Path], tmp_path: Path) -> None:
    config, reference = one_at_a_time
    out = tmp_path / "killed"
    study = subprocess.Popen([sys.executable, "-m", "knowstack.cli", "study", str(config), "--out", str(out),
                              "--jobs", "2", *OWN_STEPS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    workers: list[psutil.Process] = []
    # Kill the study once a training is under way in a worker.
    while time.monotonic() < deadline and study.poll() is None:
        if (out / "artifacts").is_dir() and list((out / "artifacts").glob(".train-*.tmp-*")):
            workers = psutil.Process(study.pid).children(recursive=True)
            break
        time.sleep(0.05)
    assert workers, "no training was under way to kill"
    study.send_signal(signal.SIGKILL)
    study.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "workers outlived the study"
    assert main(["study", str(config), "--out", str(out), "--jobs", "2", *OWN_STEPS]) == 0
    assert not list((out / "artifacts").glob(".*tmp*"))
    assert (out / "results.csv").read_text() == (reference / "results.csv").read_text()


def _estimate(params: int) -> Estimate:
    return Estimate(what="x", params=params, weights=0, grads=0, optimizer=0, activations=0, gpus=0)


def test_which_steps_share_the_cores(tmp_path: Path) -> None:
    config = load_config(tiny_study(tmp_path))
    train = Step("train", "lora-stance", {"finetune": "lora"})
    evaluation = Step("eval", "base", {})
    assert shares_cores(train, config, _estimate(5_000_000))
    assert shares_cores(evaluation, config, _estimate(5_000_000))
    assert not shares_cores(evaluation, config, _estimate(config.executor.shared_params + 1))
    assert not shares_cores(evaluation, config, None)  # size unknown: alone
    assert not shares_cores(Step("world", "test", {"preset": "test"}), config, _estimate(1000))
    launched = config.model_copy(update={"launch": config.launch.model_copy(update={"num_processes": 2})})
    assert not shares_cores(train, launched, _estimate(5_000_000))


def test_jobs_setting_and_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert resolve_jobs(3) == 3 and resolve_jobs("auto") >= 1
    with pytest.raises(KnowstackError, match="--jobs must be 1 or more"):
        make_executor("local", jobs=0)
    with pytest.raises(KnowstackError, match="--jobs is for the local executor"):
        make_executor("ray", jobs=2)
    path = tiny_study(tmp_path)
    path.write_text(path.read_text() + "executor: {jobs: 0}\n")
    assert main(["study", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "executor.jobs" in capsys.readouterr().err


def test_threads_of_a_step_beside_others() -> None:
    assert threads_per_step("share", 8, 2) == 4 and threads_per_step("share", 2, 4) == 1
    assert threads_per_step("all", 8, 2) == torch.get_num_threads()  # the thread count, so the sums, of jobs 1
    assert threads_per_step(3, 8, 2) == 3


def test_oversubscribed_workers_wait_asleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with waiting_threads_sleep(True):
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in os.environ
    with waiting_threads_sleep(False):
        assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice stands
    with waiting_threads_sleep(True):
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_steps_side_by_side_on_every_core_make_the_same_files(one_at_a_time: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    """threads: all — 2 steps at once, each on as many threads as jobs 1 uses: the same bytes as jobs 1."""
    config, reference = one_at_a_time
    path = tmp_path / "all.yaml"
    path.write_text(config.read_text() + "executor: {jobs: 2, threads: all}\n")
    out = tmp_path / "run"
    assert main(["study", str(path), "--out", str(out), *OWN_STEPS]) == 0
    for name in ("results.csv", "per_example.jsonl"):
        assert (out / name).read_text() == (reference / name).read_text()
    made, expected = _made_files(out), _made_files(reference)
    assert made.keys() == expected.keys() and [k for k in made if made[k] != expected[k]] == []
    threads = {json.loads(p.read_text())["cost"]["torch_threads"] for p in (out / "artifacts").glob("*/step.json")}
    assert threads == {torch.get_num_threads()}  # every step, side by side or alone, on jobs 1's threads


def test_threads_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert make_executor("local", jobs=2, threads="all").threads == "all"
    assert make_executor("local", threads="3").threads == 3
    with pytest.raises(KnowstackError, match="--threads must be share, all or a number"):
        make_executor("local", threads="many")
    with pytest.raises(KnowstackError, match="--threads is for the local executor"):
        make_executor("ray", threads="all")
    path = tiny_study(tmp_path)
    assert main(["study", str(path), "--out", str(tmp_path / "run"), "--threads", "0"]) == 2
    assert "--threads must be" in capsys.readouterr().err
