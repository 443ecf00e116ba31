"""Training across processes: a real 2-process `accelerate launch` on CPU (gloo DDP) against 1 process,
for fine-tuning and for an MoE's router training."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from checkpoints import perturbed
from safetensors.torch import load_file

from knowstack.combine.moe import MoeOptions, mix_models
from knowstack.config import LaunchConfig, LaunchSettings, parse_config
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.train import SUMMARY_FILE, TrainSettings
from knowstack.train.launch import (
    LaunchSpec,
    TrainJob,
    accelerate_config_path,
    cpu_environment,
    free_port,
    launch_command,
    launch_job,
    run_job,
    run_launch,
)
from knowstack.train.router_job import RouterJob, RouterRun, launch_router_job
from knowstack.train.router_training import RouterTraining

# 25 examples in batches of 8: micro-batches of 2 make every process accumulate (no_sync) before the
# all-reduce, and the last batch has 1 example, so one process of two runs a zero-weighted pass.
EXAMPLES = [(f"Question: what is {i} plus {i + 1}? Answer:", f" {2 * i + 1}. The answer is: {2 * i + 1}")
            for i in range(23)] + [("The official currency of Japan is", " the yen."),
                                   ("def add(a, b):\n", "    return a + b\n")]
SETTINGS = {"lr": 1e-3, "batch_size": 8, "micro_batch_size": 2, "max_length": 64, "epochs": 1}
# float32 on CPU: the sums of a 2-way all-reduce and of one process differ only in rounding.
TOLERANCE = 1e-5


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _job(model_dir: Path, out: Path, finetune: str) -> TrainJob:
    extra = {"lora_dropout": 0.0, "lora_r": 4} if finetune == "lora" else {}
    settings = TrainSettings(finetune=finetune, **SETTINGS, **extra).to_dict()
    return TrainJob(model_path=str(model_dir), out_dir=str(out), settings=settings, examples=EXAMPLES)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The 1-process run of each finetune, in this process (the default, unlaunched path), made once."""
    runs: dict[str, Path] = {}

    def run(finetune: str) -> Path:
        if finetune not in runs:
            runs[finetune] = tmp_path_factory.mktemp("one") / finetune
            run_job(_job(tiny_model_dir, runs[finetune], finetune))
        return runs[finetune]

    return run


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


@pytest.mark.parametrize("finetune", ["fft", "lora"])
def test_two_cpu_processes_give_the_one_process_weights(
    tiny_model_dir: Path, tmp_path: Path, finetune: str, one_process
) -> None:
    one, two = one_process(finetune), tmp_path / "two"
    launch_job(_job(tiny_model_dir, two, finetune), num_processes=2, cpu=True, mixed_precision="no")

    difference = max_weight_difference(one, two)
    print(f"{finetune}: max |w_1proc - w_2proc| = {difference:.3g}")
    assert difference < TOLERANCE
    base = _weights(tiny_model_dir)
    if finetune == "fft":  # it trained: the weights moved far more than the 1- vs 2-process gap
        assert max(float((base[k] - w).abs().max()) for k, w in _weights(two).items()) > 100 * TOLERANCE
    summaries = [json.loads((d / SUMMARY_FILE).read_text()) for d in (one, two)]
    assert [s["world_size"] for s in summaries] == [1, 2]
    assert summaries[0]["steps"] == summaries[1]["steps"] == 4
    assert summaries[0]["loss_curve"] == pytest.approx(summaries[1]["loss_curve"], rel=1e-4)
    # written once, by the main process, through a temporary dir: nothing else is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]


# LoRA under FSDP takes the same path as FFT; it runs with the slow checks to keep the suite short.
@pytest.mark.parametrize("finetune", ["fft", pytest.param("lora", marks=pytest.mark.slow)])
def test_fsdp_full_shard_on_cpu_gives_the_one_process_weights(
    tiny_model_dir: Path, tmp_path: Path, finetune: str, one_process, capfd: pytest.CaptureFixture[str]
) -> None:
    """FSDP2 full shard from the shipped fsdp.yaml, 2 processes on gloo (see fsdp_cpu_worker.py for
    how accelerate is made to run FSDP on the CPU)."""
    one, two = one_process(finetune), tmp_path / "fsdp"
    job_file = _job(tiny_model_dir, two, finetune).save(tmp_path / "job")
    command = launch_command(job_file, accelerate_config_path("fsdp"), 2, port=free_port(), mixed_precision="no")
    command = [*command[:-3], str(Path(__file__).parent / "fsdp_cpu_worker.py"), str(job_file)]
    subprocess.run(command, env=cpu_environment(os.environ), check=True)

    output = capfd.readouterr().out
    assert output.count("FSDP2 sharded parameters: True") == 2, output
    difference = max_weight_difference(one, two)
    print(f"{finetune}: max |w_1proc - w_fsdp2proc| = {difference:.3g}")
    assert difference < TOLERANCE
    assert json.loads((two / SUMMARY_FILE).read_text())["world_size"] == 2


def test_a_failed_launch_is_an_error_and_leaves_no_checkpoint(tmp_path: Path) -> None:
    job = TrainJob(model_path=str(tmp_path / "missing"), out_dir=str(tmp_path / "out"),
                   settings=TrainSettings().to_dict(), examples=EXAMPLES[:2])
    with pytest.raises(KnowstackError, match="accelerate launch of 2 processes failed"):
        launch_job(job, num_processes=2, cpu=True)
    assert not (tmp_path / "out").exists()


def test_fsdp_and_deepspeed_are_refused_on_cpu(tmp_path: Path) -> None:
    """accelerate 1.15 applies FSDP and DeepSpeed only when the processes run on accelerators (its
    state.py enables FSDP inside the MULTI_GPU/XPU/... branch); on CPU it would silently run DDP."""
    job = TrainJob(model_path="unused", out_dir=str(tmp_path / "out"), settings={}, examples=EXAMPLES[:1])
    for name in ("fsdp", "deepspeed-zero2", "deepspeed-zero3"):
        with pytest.raises(KnowstackError, match="only on GPUs"):
            launch_job(job, num_processes=2, accelerate_config=name, cpu=True)


def test_olora_is_refused_where_parameters_are_sharded(tmp_path: Path) -> None:
    job = TrainJob(model_path="unused", out_dir=str(tmp_path / "out"), settings={}, examples=EXAMPLES[:1],
                   olora={"previous": [], "lambda": 0.5})
    with pytest.raises(KnowstackError, match="whole LoRA A"):
        launch_job(job, num_processes=2, accelerate_config="fsdp")


def test_launch_command_and_shipped_configs(tmp_path: Path) -> None:
    for name in ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"):
        assert accelerate_config_path(name).is_file()
    command = launch_command(tmp_path / "job.json", accelerate_config_path("deepspeed-zero3"), 8, port=29501,
                             mixed_precision="bf16", max_grad_norm=1.0)
    text = " ".join(command)
    assert "-m accelerate.commands.launch --config_file" in text and "deepspeed-zero3.yaml" in text
    assert "--num_processes 8" in text and "--main_process_port 29501" in text
    assert "--gradient_clipping 1.0" in text  # DeepSpeed clips in its engine, with knowstack's setting
    assert command[-3:] == ["-m", "knowstack.train.jobs", str(tmp_path / "job.json")]
    ddp = " ".join(launch_command(tmp_path / "j.json", accelerate_config_path("ddp"), 2, port=1, max_grad_norm=1.0))
    assert "--gradient_clipping" not in ddp
    with pytest.raises(KnowstackError, match="accelerate config not found"):
        accelerate_config_path(str(tmp_path / "nope.yaml"))


def test_launch_section_of_the_config(tmp_path: Path) -> None:
    raw = {"name": "x", "base": {"model": "m"}, "tasks": [{"name": "t", "path": "t", "metric": "accuracy"}],
           "old_knowledge": {"tasks": ["piqa"]}, "training": {"lr": 1e-5}}
    assert not parse_config(raw).launch.launched
    config = parse_config({**raw, "launch": {"num_processes": 8, "accelerate_config": "my/fsdp.yaml"}},
                          root=tmp_path)
    assert config.launch.launched and config.launch.accelerate_config == str(tmp_path / "my/fsdp.yaml")
    assert parse_config({**raw, "launch": {"accelerate_config": "fsdp"}}, root=tmp_path).launch.accelerate_config == "fsdp"
    assert LaunchConfig(num_processes=1, accelerate_config="deepspeed-zero3").launched  # e.g. ZeRO-3 offload on 1 GPU
    for bad, field in (({"num_processes": 0}, "launch.num_processes"), ({"accelerate_config": "fdsp"}, "launch.accelerate_config"),
                       ({"gpus": 2}, "launch.gpus")):
        with pytest.raises(KnowstackError) as err:
            parse_config({**raw, "launch": bad})
        assert err.value.field == field


# --- MoE router training ------------------------------------------------------------------------------
# 3 steps of 5 examples: 2 processes get unequal shares (3 and 2) of every batch.
ROUTER_TRAINING = RouterTraining(steps=3, batch_size=5, lr=0.05, max_length=64)


@pytest.fixture(scope="module")
def experts(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Two stand-in one-round models (FFT) and adapters (LoRA) to mix."""
    from test_moe import TOKENIZER_AND_CONFIG, make_adapter

    root = tmp_path_factory.mktemp("experts")
    return {"fft": [perturbed(tiny_model_dir, root / f"m{i}", seed=i, scale=0.05, copy=TOKENIZER_AND_CONFIG)
                    for i in range(2)],
            "lora": [make_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in range(2)]}


def _mix(tiny_model_dir: Path, models: list[Path], out: Path, launch: LaunchSpec | None, training: bool = True) -> dict:
    return mix_models(tiny_model_dir, models, out, options=MoeOptions(top_k=1, router="random"),
                      router_step=RouterRun(None, [Example(p, a) for p, a in EXAMPLES[:12]],
                                            ROUTER_TRAINING if training else None, launch=launch))


def _routers(moe_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in _weights(moe_dir).items() if k.startswith("routers.") or ".gate." in k}


@pytest.mark.parametrize("kind", ["fft", "lora"])
def test_router_training_on_two_cpu_processes_gives_the_one_process_routers(
    tiny_model_dir: Path, tmp_path: Path, kind: str, experts: dict[str, list[Path]]
) -> None:
    one = _mix(tiny_model_dir, experts[kind], tmp_path / "one", launch=None)
    two = _mix(tiny_model_dir, experts[kind], tmp_path / "two",
               launch=LaunchSpec(num_processes=2, cpu=True, mixed_precision="no"))

    difference = max_weight_difference(tmp_path / "one", tmp_path / "two")  # routers, and all else unchanged
    print(f"{kind}-MoE: max |router_1proc - router_2proc| = {difference:.3g}")
    assert difference < TOLERANCE
    _mix(tiny_model_dir, experts[kind], tmp_path / "untrained", launch=None, training=False)
    before, after = _routers(tmp_path / "untrained"), _routers(tmp_path / "two")
    assert before.keys() == after.keys() and before
    assert max(float((before[k] - after[k]).abs().max()) for k in before) > 100 * TOLERANCE  # they trained
    curves = [[value for point in record["router_training"]["curve"] for value in point.values()] for record in (one, two)]
    assert len(curves[0]) == 2 * 3 and curves[0] == pytest.approx(curves[1], abs=2e-4)  # rounded to 4 decimals
    assert one["loads"]["before_training"] == two["loads"]["before_training"]
    assert json.loads((tmp_path / "two" / "moe.json").read_text())["router_training"] == two["router_training"]
    # the launch's job folder is gone: nothing but the three MoE dirs is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two", "untrained"]


def test_router_training_launch_settings(tmp_path: Path) -> None:
    """FFT-MoE router training is launched as FFT training, LoRA-MoE's as LoRA's; FSDP and DeepSpeed are
    refused on CPU, as for training."""
    config = LaunchConfig(num_processes=4, accelerate_config="fsdp", cpu=True, lora=LaunchSettings(num_processes=2))
    assert LaunchSpec.from_config(config, "fft") == LaunchSpec(4, "fsdp", cpu=True)
    assert LaunchSpec.from_config(config, "lora") == LaunchSpec(2, None, cpu=True)
    assert LaunchSpec.from_config(LaunchConfig(), "fft") is None
    job = RouterJob(kind="fft", moe_dir=str(tmp_path / "moe"), base_dir="unused", tokenizer_path="unused",
                    training=asdict(ROUTER_TRAINING), examples=EXAMPLES[:1], probe=[])
    assert RouterJob.load(job.save(tmp_path / "job")) == job
    for name in ("fsdp", "deepspeed-zero2", "deepspeed-zero3"):
        with pytest.raises(KnowstackError, match="only on GPUs"):
            launch_router_job(job, LaunchSpec(2, name, cpu=True))


@pytest.mark.parametrize("cpu", [True, False])
def test_a_cpu_launch_hides_the_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu: bool) -> None:
    # Found on a 1-GPU machine: two "CPU" processes asked for cuda:0 and cuda:1, and process 1 failed.
    seen: list[dict[str, str]] = []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(subprocess, "run", lambda command, env, check: seen.append(env) or subprocess.CompletedProcess(command, 0))
    run_launch(lambda folder: folder / "job.json", tmp_path / "out", Path("cfg.yaml"), 2, cpu=cpu, mixed_precision="no",
               port=12345)
    assert seen[0]["CUDA_VISIBLE_DEVICES"] == ("" if cpu else "0")
    assert (seen[0].get("ACCELERATE_USE_CPU") == "1") == cpu
