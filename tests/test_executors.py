"""Executors: the local one and Ray (a local 2-CPU Ray cluster) give the same study; a killed Ray worker's
step is retried and leaves no corrupt artifact."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
from test_study import tiny_study

from knowstack.cli import main
from knowstack.config import load_config
from knowstack.errors import KnowstackError
from knowstack.study.executors import LocalExecutor, RayExecutor, make_executor
from knowstack.study.plan import Step
from knowstack.study.resources import Estimate, GiB, StepResources, step_resources
from knowstack.study.runner import run_study

# One-round LoRA on every built-in task: the world, 7 trainings (each several seconds long, so a
# worker can be killed mid-step) and 8 evaluations, which Ray runs two at a time.
METHODS = {"one-round": {"finetune": ["lora"]}}
EPOCHS = 6


def _config(tmp: Path) -> Path:
    path = tiny_study(tmp, METHODS)
    path.write_text(path.read_text().replace("epochs: 1", f"epochs: {EPOCHS}"))
    assert f"epochs: {EPOCHS}" in path.read_text()
    return path


@pytest.fixture(scope="module")
def ray_module():
    return pytest.importorskip("ray", reason="the Ray executor's tests need Ray: pip install 'knowstack[ray]'")


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("local")
    config = _config(tmp)
    assert main(["study", str(config), "--out", str(tmp / "run"), "--no-shared-cache"]) == 0
    return config, tmp / "run"


@pytest.fixture
def ray_cluster(ray_module):
    ray_module.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray_module
    ray_module.shutdown()


def _ray_run(config: Path, out: Path) -> None:
    # its own steps: linked from the local study's (the shared step cache), Ray would run none
    outcome = run_study(load_config(config), out, executor=RayExecutor(), config_text=config.read_text(),
                        shared_cache=False)
    assert outcome is not None and outcome.steps_run == 16


@pytest.mark.slow
def test_ray_gives_the_local_results(local_reference: tuple[Path, Path], ray_cluster, tmp_path: Path) -> None:
    config, local = local_reference
    _ray_run(config, tmp_path / "ray")
    assert (tmp_path / "ray" / "results.csv").read_text() == (local / "results.csv").read_text()
    assert not list((tmp_path / "ray" / "artifacts").glob(".*tmp*"))


def _step_workers() -> list[psutil.Process]:
    """Ray names a worker's process after the task it runs: 'ray::knowstack:<kind>:<label>'."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info.get("cmdline") or [])
        if cmdline.startswith("ray::knowstack:train:"):
            found.append(process)
    return found


@pytest.mark.slow
def test_a_killed_ray_worker_is_retried(local_reference: tuple[Path, Path], ray_cluster, tmp_path: Path) -> None:
    config, local = local_reference
    out = tmp_path / "killed"
    errors: list[BaseException] = []

    def study() -> None:
        try:
            _ray_run(config, out)
        except BaseException as err:  # reported below, in the test's own thread
            errors.append(err)

    thread = threading.Thread(target=study)
    thread.start()
    killed, cut_off = [], []
    deadline = time.monotonic() + 300
    # Kill the workers of the first training under way, once it has been running a moment.
    while not killed and thread.is_alive() and time.monotonic() < deadline:
        workers = _step_workers()
        partial = list((out / "artifacts").glob(".train-*.tmp-*")) if (out / "artifacts").exists() else []
        if workers and partial:
            time.sleep(0.5)
            cut_off = [p.name.split(".tmp-")[0][1:] for p in partial]
            for worker in workers:
                worker.kill()
                killed.append(worker.pid)
        time.sleep(0.05)
    thread.join(timeout=600)
    assert not errors, errors
    assert killed and cut_off, "no training was under way to kill"
    for key in cut_off:  # the cut-off step was run again, to completion
        assert (out / "artifacts" / key / "adapter_model.safetensors").is_file()
        assert (out / "artifacts" / key / "step.json").is_file()
    assert not list((out / "artifacts").glob(".*tmp*"))  # the killed attempt's temporary dir is gone
    assert (out / "results.csv").read_text() == (local / "results.csv").read_text()


def test_local_executor_clears_a_killed_attempt(tmp_path: Path) -> None:
    """What a killed process leaves (a temporary dir beside the artifact) goes when the step runs again."""
    from knowstack.study.executors import clear_stale
    from knowstack.study.steps import StudyContext

    ctx = StudyContext(out=tmp_path, config=load_config(tiny_study(tmp_path)))
    step = Step("world", "test", {"preset": "test"})
    stale = ctx.artifacts / f".{step.key}.tmp-abc123"
    other = ctx.artifacts / ".world-other-0123.tmp-x"
    for path in (stale, other, ctx.artifact(step.key)):
        path.mkdir(parents=True)
    clear_stale(step, ctx)
    assert not stale.exists() and other.exists() and ctx.artifact(step.key).exists()


def test_make_executor_and_cli_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert isinstance(make_executor("local"), LocalExecutor)
    with pytest.raises(KnowstackError, match="--address is for the ray executor"):
        make_executor("local", "auto")
    with pytest.raises(KnowstackError, match="unknown executor"):
        make_executor("dask")
    config = tiny_study(tmp_path)
    assert main(["study", str(config), "--out", str(tmp_path / "run"), "--address", "auto"]) == 2
    assert "--address is for the ray executor" in capsys.readouterr().err


def test_ray_task_resources(tmp_path: Path) -> None:
    raw = tiny_study(tmp_path).read_text()
    (tmp_path / "launched.yaml").write_text(raw + "launch: {num_processes: 4, lora: {num_processes: 2}}\n")
    config = load_config(tmp_path / "launched.yaml")
    fft = Step("train", "fft-x", {"finetune": "fft"})
    lora = Step("train", "lora-x", {"finetune": "lora"})
    merge = Step("merge", "m", {})
    assert step_resources(fft, config) == StepResources(cpus=4.0, gpus=4)
    assert step_resources(lora, config) == StepResources(cpus=2.0, gpus=2)
    # merges stream on the CPU; an evaluation takes a GPU where its model fits one, else the CPU
    assert step_resources(merge, config).gpus == 0
    assert step_resources(Step("eval", "e", {}), config).gpus == 1
    # an MoE is built on the CPU; its router training is launched as its experts' training is
    trained = {"router_training": {"steps": 2}}
    assert step_resources(Step("moe", "m", {"experts": "lora", "options": trained}), config) == StepResources(cpus=2.0, gpus=2)
    assert step_resources(Step("moe", "m", {"experts": "fft", "options": {"router_training": None}}), config).gpus == 0
    too_big = Estimate("eval", 40 * 10**9, 160 * GiB, 0, 0, 40 * GiB, gpus=3)
    assert step_resources(Step("eval", "e", {}), config, too_big).gpus == 0
    gpu_cluster = {"CPU": 64.0, "GPU": 8.0, "max_node_memory": 1e12}
    assert step_resources(fft, config).ray_options(gpu_cluster, "fft-x") == {"num_cpus": 4.0, "num_gpus": 4}
    # a cluster without GPUs runs every step on its CPUs (the built-in world)
    assert step_resources(fft, config).ray_options({"CPU": 2.0}, "fft-x") == {"num_cpus": 4.0}
    with pytest.raises(KnowstackError, match="needs 4 GPUs; the Ray cluster has 2"):
        step_resources(fft, config).ray_options({"CPU": 8.0, "GPU": 2.0}, "fft-x")
    cpu_step = StepResources(1.0, 0, memory=2**20, cpu_memory=2**30)
    assert cpu_step.ray_options({"CPU": 2.0, "max_node_memory": 8 * 2**30}, "e") == {"num_cpus": 1.0, "memory": 2**30}
    assert cpu_step.ray_options({"CPU": 2.0, "max_node_memory": 2**29}, "e") == {"num_cpus": 1.0}  # no node has it
    gpu_step = StepResources(1.0, 1, memory=2**20, cpu_memory=2**30)
    assert gpu_step.ray_options(gpu_cluster, "t") == {"num_cpus": 1.0, "num_gpus": 1, "memory": 2**20}


def test_ray_executor_uses_a_running_ray_or_explains_it_is_missing(tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(KnowstackError, match=r"pip install 'knowstack\[ray\]'"):
        make_executor("ray")
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_a_study_launching_two_processes_per_training_gives_the_same_results(
    local_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    """The runner launches every train step as 2 CPU processes (accelerate, gloo DDP); the launch section
    is in no step's key, so the plan is the local one's."""
    config, local = local_reference
    launched = tmp_path / "launched.yaml"
    launched.write_text(config.read_text() + "launch: {num_processes: 2, cpu: true, mixed_precision: 'no'}\n")
    out = tmp_path / "run"
    assert main(["study", str(launched), "--out", str(out), "--no-shared-cache"]) == 0
    summaries = [json.loads(p.read_text()) for p in (out / "artifacts").glob("train-*/train_summary.json")]
    assert len(summaries) == 7 and all(s["world_size"] == 2 for s in summaries)
    assert sorted(p.name for p in (out / "artifacts").iterdir()) == sorted(p.name for p in (local / "artifacts").iterdir())
    assert (out / "results.csv").read_text() == (local / "results.csv").read_text()
