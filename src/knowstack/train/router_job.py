"""An MoE's routers at work as a training job that runs in this process or under `accelerate launch`.

mix_models (combine/moe.py) builds the MoE into its temporary output dir, then hands that dir to its caller's
router step: a `RouterRun` (what the MoE method, study/steps.py, and api.mix pass), which makes a `RouterJob` (plain
data: the kind, the dirs, the training set, the RouterTraining settings, the probe texts) and runs it: the expert
load per router on the probe texts and, with training settings, router training and the load again. `run_router_job` runs it here; `launch_router_job` starts it as `accelerate launch ... -m
knowstack.train.jobs job.json` (job.json says job_kind "router"), whose processes each load the MoE,
train the routers on their share of every batch (router_training.py), and of which the main process alone
writes the trained routers into the MoE dir and the record (loads, loss curve) beside the job. Both
paths run the very same code, so 2 processes give the 1-process routers (tested on CPU with gloo).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from knowstack.atomic import atomic_write_json
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.train.launch import JOB_FILE, ROUTER_JOB_KIND, LaunchSpec, checked_config, run_launch
from knowstack.train.router_training import RouterTraining, router_sites

RECORD_FILE = "record.json"


@dataclass(frozen=True)
class RouterJob:
    """Everything router training needs, as JSON-able values (it crosses a process boundary)."""

    kind: str  # "fft" or "lora"
    moe_dir: str  # the MoE being built (mix_models' temporary output dir); trained routers go there
    base_dir: str
    tokenizer_path: str
    training: dict[str, Any] | None  # RouterTraining's fields; None: measure the expert load only
    examples: list[tuple[str, str]] = field(repr=False)
    probe: list[str] = field(repr=False)  # the texts the expert load is measured on
    probe_name: str = "prompts"
    # Launched processes each take their own device (a GPU each); in this process the MoE stays where it
    # is loaded, on the CPU, as it always did (a large FFT-MoE may fit no single GPU).
    place_on_device: bool = False
    record_file: str | None = None  # where the main process writes the record (a launch's way back)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / JOB_FILE, {"job_kind": ROUTER_JOB_KIND, **asdict(self)})
        return folder / JOB_FILE

    @classmethod
    def load(cls, path: Path) -> RouterJob:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data.pop("job_kind")
        return cls(**{**data, "examples": [tuple(pair) for pair in data["examples"]]})


@dataclass(frozen=True)
class RouterRun:
    """A mixture's router step (combine/moe.py mix_models' `router_step`): the expert load on the prompts (each
    model's few, in order) or, with `training`, router training on `train_examples` and the load before and after
    on them; in this process or, with `launch` and training, as `accelerate launch` of launch.num_processes
    processes (the same routers either way). tokenizer_path: None, the base's."""

    prompts: Sequence[Sequence[str]] | None = None
    train_examples: Sequence[Example] | None = None
    training: RouterTraining | None = None
    tokenizer_path: str | Path | None = None
    launch: LaunchSpec | None = None

    def __post_init__(self) -> None:
        if self.training is not None and not self.train_examples:  # before the mixture is built
            raise KnowstackError("router training needs examples", field="router_training")

    @property
    def trains(self) -> bool:
        return self.training is not None

    def needed(self) -> bool:
        """Whether it has anything to do: prompts to measure the load on, or routers to train."""
        return bool(self.prompts) or self.trains

    def __call__(self, kind: str, moe_dir: Path, base_dir: Path) -> dict[str, Any]:
        """moe.json's part: {"loads": ..., "router_training": ...}; nothing where there is nothing to do."""
        if not self.needed():
            return {}
        job = self.job(kind, moe_dir, base_dir)
        return launch_router_job(job, self.launch) if self.launch and self.trains else run_router_job(job)

    def job(self, kind: str, moe_dir: Path, base_dir: Path) -> RouterJob:
        """The expert load per layer on the probe texts, and router training (then the load again, and the
        trained routers written into the MoE dir), as a job."""
        examples = self.train_examples or []
        if self.training is not None:
            probe, probe_name = [ex.prompt + ex.answer for ex in examples], "router training set"
        else:
            probe, probe_name = [p for group in self.prompts or [] for p in group], "prompts"
        return RouterJob(kind=kind, moe_dir=str(moe_dir), base_dir=str(base_dir),
                         tokenizer_path=str(self.tokenizer_path or base_dir),
                         training=None if self.training is None else asdict(self.training),
                         examples=[(ex.prompt, ex.answer) for ex in examples] if self.training else [],
                         probe=probe, probe_name=probe_name)


def run_router_job(job: RouterJob) -> dict[str, Any]:
    """The expert load (and router training) of the MoE in job.moe_dir, in every process of a launch;
    returns moe.json's part: {"loads": ..., "router_training": ...}."""
    from accelerate import Accelerator

    from knowstack.modelio import load_tokenizer

    accelerator = Accelerator(device_placement=job.place_on_device)
    tokenizer = load_tokenizer(job.tokenizer_path)
    model = load_moe(job.kind, Path(job.moe_dir), Path(job.base_dir))
    if job.training is None:
        record = _measured(job, model, tokenizer)
    else:
        record = _trained(job, accelerator, model, tokenizer)
    if job.record_file is not None and accelerator.is_main_process:
        atomic_write_json(Path(job.record_file), record)
    accelerator.wait_for_everyone()
    # In this process, the MoE (held by the accelerator too, in reference cycles) goes now, not later.
    del model, accelerator
    gc.collect()
    return record


def _measured(job: RouterJob, model: Any, tokenizer: Any) -> dict[str, Any]:
    from knowstack.train.router_training import expert_loads

    return {"loads": {"measured_on": f"{job.probe_name} ({len(job.probe)} texts)",
                      "before_training": expert_loads(model, tokenizer, job.probe)}}


def _trained(job: RouterJob, accelerator: Any, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Loads before, training, loads after (every process, on the prepared model: under FSDP each
    forward is collective), then the main process writes the trained routers."""
    from knowstack.train.router_training import prepare_router_training, train_routers

    settings = RouterTraining(**job.training or {})
    prepared, optimizer, sites = prepare_router_training(model, settings, accelerator)
    unwrapped = accelerator.unwrap_model(prepared)
    record = _measured(job, unwrapped, tokenizer)
    examples = [Example(prompt, answer) for prompt, answer in job.examples]
    summary = train_routers(prepared, optimizer, sites, tokenizer, examples, settings, accelerator)
    record["router_training"] = {"settings": asdict(settings), **summary}
    record["loads"]["after_training"] = _measured(job, unwrapped, tokenizer)["loads"]["before_training"]
    _gather_routers(sites)
    if accelerator.is_main_process:
        save_trained_routers(job.kind, Path(job.moe_dir), unwrapped)
    return record


def load_moe(kind: str, moe_dir: Path, base: Path) -> Any:
    """The built MoE as a model in memory: the checkpoint (FFT), or the base with the LoRA-MoE on it."""
    from knowstack.modelio import load_model

    if kind == "fft":
        return load_model(moe_dir, dtype="auto")
    from knowstack.modeling.lora_moe import apply_lora_moe

    return apply_lora_moe(load_model(base, dtype="auto"), moe_dir)


def save_trained_routers(kind: str, moe_dir: Path, model: Any) -> None:
    """The routers of `model` (trained) written into the MoE dir it was loaded from, in place."""
    if kind == "lora":
        from knowstack.modeling.lora_moe import lora_moe_routers, save_routers

        save_routers(moe_dir, lora_moe_routers(model))
        return
    from knowstack.modeling.families import stock_moe_of
    from knowstack.modeling.streaming import overwrite_tensors

    # Every router module (the MLPs' and the mixed attention projections') by its path in the model,
    # which is its tensors' name on disk but where a stock class names its block otherwise there (Mixtral's
    # block_sparse_moe, loaded as mlp).
    paths = {id(module): path for path, module in model.named_modules()}
    stock = stock_moe_of(getattr(model.config, "model_type", None))
    block = stock.block if stock is not None else "mlp"
    tensors = {}
    for site in router_sites(model):
        for suffix, param in site.module.named_parameters():
            memory_name = f"{paths[id(site.module)]}.{suffix}"
            tensors[memory_name.replace(".mlp.gate.", f".{block}.gate.")] = param
    overwrite_tensors(moe_dir, tensors)


def _gather_routers(sites: list) -> None:
    """Where parameters are sharded (FSDP2's DTensors), every process gathers the routers' whole
    tensors (collective), so that the main process writes whole routers; a no-op otherwise. Done
    after the last forward: the routers are plain tensors from here on."""
    from torch import nn

    for site in sites:
        for name, param in list(site.module.named_parameters()):
            if hasattr(param, "full_tensor"):
                owner_name, _, leaf = name.rpartition(".")
                owner = site.module.get_submodule(owner_name) if owner_name else site.module
                setattr(owner, leaf, nn.Parameter(param.full_tensor().detach(), requires_grad=False))


def launch_router_job(job: RouterJob, launch: LaunchSpec, *, port: int | None = None) -> dict[str, Any]:
    """Run `job` as `accelerate launch` of launch.num_processes processes; returns its record once the
    trained routers are written."""
    config_path = checked_config(launch.accelerate_config, launch.cpu)
    record: dict[str, Any] = {}

    def save(folder: Path) -> Path:
        return replace(job, place_on_device=True, record_file=str(folder / RECORD_FILE)).save(folder)

    def read_record(folder: Path) -> None:
        path = folder / RECORD_FILE
        if not path.is_file():
            raise KnowstackError("accelerate launch finished without writing the router training record",
                                 path=job.moe_dir)
        record.update(json.loads(path.read_text(encoding="utf-8")))

    run_launch(save, Path(job.moe_dir), config_path, launch.num_processes, cpu=launch.cpu,
               mixed_precision=launch.mixed_precision, port=port, on_success=read_record)
    return record
