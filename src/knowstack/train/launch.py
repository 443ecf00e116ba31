"""One training run as a job that runs in this process or under `accelerate launch` with N processes.

A study's train step becomes a `TrainJob` (plain data: model, examples, settings, O-LoRA inputs), and
an MoE's router training a `RouterJob` (train/router_job.py), which job.json names by its job_kind.
`run_job` (`run_router_job`) runs it here; `launch_job` (`launch_router_job`) writes it to a folder
and starts `accelerate launch --config_file <cfg> --num_processes N -m knowstack.train.jobs job.json`,
whose processes each run the same job: `train()` (`train_routers()`) shards every effective batch over
them and the main process alone writes the checkpoint (the trained routers), atomically. Both paths
run the very same code, so a 2-process run gives the 1-process weights (tested on CPU with gloo).

On CPU the processes are started with accelerate's multi-GPU launcher (torchrun) and
ACCELERATE_USE_CPU=1: accelerate 1.x starts only one process for `--cpu` without MPI, and picks
multi-CPU DDP (gloo) only when told to use the CPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from knowstack.config import ACCELERATE_CONFIGS, LaunchConfig, LaunchSettings
from knowstack.errors import KnowstackError

ACCELERATE_DIR = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
JOB_FILE = "job.json"
EXAMPLES_FILE = "examples.jsonl"
# job.json of a TrainJob has no job_kind (as before there were other jobs); a router job names its kind
ROUTER_JOB_KIND = "router"


@dataclass(frozen=True)
class TrainJob:
    """Everything one training run needs, as JSON-able values (it crosses a process boundary)."""

    model_path: str
    out_dir: str
    settings: dict[str, Any]
    examples: list[tuple[str, str]] = field(repr=False)
    adapter_init: str | None = None
    progress_desc: str = "train"
    # O-LoRA: the earlier rounds' adapter dirs and the penalty weight
    olora: dict[str, Any] | None = None
    # EWC: the earlier rounds' Fisher files (safetensors, round order), the penalty weight and the Fisher's decay;
    # LwF: the distillation's weight and temperature (train/regularizers.py)
    ewc: dict[str, Any] | None = None
    lwf: dict[str, Any] | None = None
    # experiment trackers (train/tracking.py Tracking.to_dict()): not a setting, never in a cache key
    tracking: dict[str, Any] | None = None
    # the base's own options, as evaluation honours them: a tokenizer other than the model dir's, remote code
    tokenizer: str | None = None
    trust_remote_code: bool = False

    def save(self, folder: Path) -> Path:
        """job.json plus the examples as JSON Lines beside it (they can be large)."""
        folder.mkdir(parents=True, exist_ok=True)
        lines = (json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) for p, a in self.examples)
        (folder / EXAMPLES_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        header = {k: v for k, v in asdict(self).items() if k != "examples"}
        (folder / JOB_FILE).write_text(json.dumps(header, indent=2), encoding="utf-8")
        return folder / JOB_FILE

    @classmethod
    def load(cls, path: Path) -> TrainJob:
        header = json.loads(Path(path).read_text(encoding="utf-8"))
        with (Path(path).parent / EXAMPLES_FILE).open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        return cls(examples=[(r["prompt"], r["answer"]) for r in rows], **header)


def run_job(job: TrainJob) -> dict[str, Any]:
    """Train (in every process of a launch), then record O-LoRA's, EWC's or LwF's term (main process only)."""
    from accelerate import PartialState

    from knowstack.data.formats import Example
    from knowstack.train.loop import train
    from knowstack.train.settings import TrainSettings
    from knowstack.train.tracking import Tracking

    penalty = _penalty(job.olora)
    ewc, lwf = _regularizers(job)
    summary = train(job.model_path, [Example(p, a) for p, a in job.examples], job.out_dir,
                    TrainSettings.from_dict(job.settings), adapter_init=job.adapter_init,
                    progress_desc=job.progress_desc, extra_loss=penalty or ewc, micro_loss=lwf,
                    tracking=Tracking(**job.tracking) if job.tracking else None, tokenizer_path=job.tokenizer,
                    trust_remote_code=job.trust_remote_code)
    if penalty is not None and PartialState().is_main_process:
        _record_olora(Path(job.out_dir), penalty)
    for name, term in (("ewc", ewc), ("lwf", lwf)):
        if term is not None and PartialState().is_main_process:
            _record_summary(Path(job.out_dir), name, term.record())
    return summary


def _regularizers(job: TrainJob) -> tuple[Any, Any]:  # -> (EwcPenalty | None, LwfDistillation | None)
    if job.ewc is None and job.lwf is None:
        return None, None
    if job.olora is not None:
        raise KnowstackError("a round takes one regulariser: O-LoRA, EWC or LwF")
    from knowstack.train.regularizers import EwcPenalty, LwfDistillation, online_fisher

    ewc = EwcPenalty(online_fisher(job.ewc["fisher"], job.ewc["decay"]), job.ewc["lambda"]) if job.ewc else None
    lwf = LwfDistillation(job.lwf["lambda"], job.lwf["temperature"]) if job.lwf else None
    return ewc, lwf


def _record_summary(out: Path, name: str, record: dict[str, Any]) -> None:
    """A regulariser's record into the train summary, under `name`."""
    from knowstack.atomic import atomic_write_json
    from knowstack.train.loop import SUMMARY_FILE

    summary = json.loads((out / SUMMARY_FILE).read_text())
    summary[name] = record
    atomic_write_json(out / SUMMARY_FILE, summary)


def _penalty(olora: dict[str, Any] | None):  # -> OLoraPenalty | None
    if olora is None:
        return None
    from knowstack.train.olora import OLoraPenalty, stack_previous

    return OLoraPenalty(stack_previous(olora["previous"]), olora["lambda"])


def _record_olora(out: Path, penalty: Any) -> None:
    """A_prev as safetensors beside the adapter, and the penalty of every step in the train summary."""
    from knowstack.train.olora import PREVIOUS_A_FILE, save_previous

    save_previous(out / PREVIOUS_A_FILE, penalty.previous)
    _record_summary(out, "olora", penalty.record())


# --- launching -------------------------------------------------------------------------------------
def accelerate_config_path(name_or_path: str | None) -> Path:
    """A shipped config by name (ddp, fsdp, deepspeed-zero2, deepspeed-zero3; default ddp) or a YAML path."""
    name = name_or_path or "ddp"
    path = ACCELERATE_DIR / f"{name}.yaml" if name in ACCELERATE_CONFIGS else Path(name).expanduser()
    if not path.is_file():
        raise KnowstackError("accelerate config not found", path=path, field="launch.accelerate_config")
    return path


def read_accelerate_config(config_path: Path) -> dict[str, Any]:
    return yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}


def launched_mixed_precision(launch: LaunchSettings) -> str | None:
    """The mixed precision a launch runs with: the launch's own, else its accelerate config file's (the shipped
    ones say bf16); None where it runs none ('no') or is not launched (one process, no autocast). It changes the
    numbers, so it keys the steps launched."""
    if not launch.launched:
        return None
    mixed_precision = launch.mixed_precision
    if mixed_precision is None:
        try:
            mixed_precision = read_accelerate_config(accelerate_config_path(launch.accelerate_config)).get(
                "mixed_precision")
        except KnowstackError:
            return None  # a config that is not there is the input checks' to report
    return None if mixed_precision in (None, "no") else str(mixed_precision)


def distributed_type(config_path: Path) -> str:
    """MULTI_GPU, FSDP, DEEPSPEED, ... as the accelerate config file names it."""
    return str(read_accelerate_config(config_path).get("distributed_type", "NO")).upper()


def shards_parameters(config_path: Path) -> bool:
    """FSDP and ZeRO-3 hold a shard of each parameter per process (O-LoRA's penalty needs whole A)."""
    data = read_accelerate_config(config_path)
    kind = str(data.get("distributed_type", "")).upper()
    return kind == "FSDP" or (kind == "DEEPSPEED" and int((data.get("deepspeed_config") or {}).get("zero_stage", 0)) == 3)


def free_port() -> int:
    """A port for the launch's rendezvous: two launched steps on one node must not share one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(
    job_file: Path,
    config_path: Path,
    num_processes: int,
    *,
    port: int,
    mixed_precision: str | None = None,
    max_grad_norm: float | None = None,
) -> list[str]:
    """The `accelerate launch` command line for one job."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
               "--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", str(port)]
    if mixed_precision is not None:
        command += ["--mixed_precision", mixed_precision]
    if max_grad_norm is not None and distributed_type(config_path) == "DEEPSPEED":
        # DeepSpeed clips inside its engine step (accelerate's clip_grad_norm_ is a no-op there).
        command += ["--gradient_clipping", str(max_grad_norm)]
    return [*command, "-m", "knowstack.train.jobs", str(job_file)]


@dataclass(frozen=True)
class LaunchSpec:
    """How a job is launched (launch_job's arguments), as a study config's launch section gives them."""

    num_processes: int
    accelerate_config: str | None = None
    cpu: bool = False
    mixed_precision: str | None = None

    @classmethod
    def from_config(cls, launch: LaunchConfig, finetune: str) -> LaunchSpec | None:
        """The launch of `finetune`'s steps (fft, or lora with its own settings); None: in-process."""
        settings = launch.for_finetune(finetune)
        if not settings.launched:
            return None
        return cls(settings.num_processes, settings.accelerate_config, launch.cpu, settings.mixed_precision)


def launch_job(
    job: TrainJob,
    *,
    num_processes: int,
    accelerate_config: str | None = None,
    cpu: bool = False,
    mixed_precision: str | None = None,
    port: int | None = None,
) -> None:
    """Run `job` as `accelerate launch` with num_processes processes; returns when the checkpoint is written."""
    config_path = checked_config(accelerate_config, cpu)
    if job.olora is not None and shards_parameters(config_path):
        raise KnowstackError("O-LoRA's penalty needs whole LoRA A matrices in every process: use ddp or "
                             "deepspeed-zero2, not a config that shards parameters", field="launch.accelerate_config")
    if (job.ewc is not None or job.lwf is not None) and shards_parameters(config_path):
        raise KnowstackError("EWC's penalty and LwF's teacher need whole weights in every process: use ddp or "
                             "deepspeed-zero2, not a config that shards parameters", field="launch.accelerate_config")
    run_launch(job.save, Path(job.out_dir), config_path, num_processes, cpu=cpu, mixed_precision=mixed_precision,
               port=port, max_grad_norm=job.settings.get("max_grad_norm"))
    if not Path(job.out_dir).is_dir():
        raise KnowstackError("accelerate launch finished without writing the checkpoint", path=job.out_dir)


def run_or_launch(job: TrainJob, launch: LaunchSpec | None) -> None:
    """`job` in this process (launch None), or as `accelerate launch` the way `launch` says: one job either way."""
    if launch is None:
        run_job(job)
    else:
        launch_job(job, num_processes=launch.num_processes, accelerate_config=launch.accelerate_config,
                   cpu=launch.cpu, mixed_precision=launch.mixed_precision)


def checked_config(accelerate_config: str | None, cpu: bool) -> Path:
    """The accelerate config's path, refused where accelerate would not do what it says."""
    config_path = accelerate_config_path(accelerate_config)
    kind = distributed_type(config_path)
    if cpu and kind in ("FSDP", "DEEPSPEED"):
        # accelerate 1.x applies FSDP/DeepSpeed only on accelerators and silently falls back to DDP on
        # CPU, which would not be what the config says.
        raise KnowstackError(f"accelerate runs {kind} only on GPUs; on CPU use the ddp config",
                             field="launch.accelerate_config")
    return config_path


def cpu_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of processes launched on the CPU: accelerate's multi-CPU mode, and no GPU in sight (on a
    machine with GPUs, process 1 would otherwise ask for cuda:1)."""
    return {**environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}


def run_launch(
    save: Callable[[Path], Path],
    output: Path,
    config_path: Path,
    num_processes: int,
    *,
    cpu: bool,
    mixed_precision: str | None,
    port: int | None,
    max_grad_norm: float | None = None,
    on_success: Callable[[Path], None] | None = None,
) -> None:
    """`accelerate launch` of the job that save(folder) writes as folder/job.json, in a temporary folder
    beside `output` (what the job writes, named in the error); returns when all processes have ended.
    on_success(folder) reads what the job left in the folder, before it is removed."""
    env = cpu_environment(os.environ) if cpu else dict(os.environ)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".launch-", dir=output.parent) as folder:
        command = launch_command(save(Path(folder)), config_path, num_processes, port=port or free_port(),
                                 mixed_precision=mixed_precision, max_grad_norm=max_grad_norm)
        result = subprocess.run(command, env=env, check=False)
        if result.returncode != 0:
            raise KnowstackError(f"accelerate launch of {num_processes} processes failed (exit {result.returncode})",
                                 path=output)
        if on_success is not None:
            on_success(Path(folder))
