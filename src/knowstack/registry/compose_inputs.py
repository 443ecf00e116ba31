"""What a compose builds from: its options (ComposeOptions, every knob of every method, flat as the command line
gives them) and its inputs (Build: the base, the chosen contributions, their tasks, the work dir).

Both registry/compose.py (which chooses and checks them) and registry/compose_plan.py (which runs the study's
catalog on them) read these, and neither imports the other's types: compose imports compose_plan, never back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from knowstack.combine.merges import OPTIONS as MERGE_OPTIONS
from knowstack.config import (
    PAPER_LR,
    JointConfig,
    MoeConfig,
    OLoraConfig,
    ReplayConfig,
    RouterTrainingConfig,
    SearchConfig,
    TrainingConfig,
)
from knowstack.registry.core import Registry
from knowstack.registry.evaluate import RegisteredTask

if TYPE_CHECKING:
    from knowstack.train.launch import LaunchSpec

MODEL_DIR = "model"

_TRAINING, _MOE, _ROUTERS = TrainingConfig(), MoeConfig(), RouterTrainingConfig()


# The merge methods' options, one field per declaration (combine/merges/), with its declared default.
MergeKnobs = make_dataclass("MergeKnobs", [(option.field, option.type, field(default=option.default))
                                           for option in MERGE_OPTIONS.values()], frozen=True)


@dataclass(frozen=True)
class ComposeOptions(MergeKnobs):  # type: ignore[misc,valid-type]
    """Every knob of every method, flat as the command line gives them; each method records (and is keyed by) only the
    ones it reads, and they become its config section (study/methods/). Every default is the study config's own
    declaration (config.py, and combine/merges/ for the merges' options: MergeKnobs), so a compose and a study with
    the same settings build the same model."""

    # MoE: experts per token, router init, and optional router-only training (0 steps: none)
    top_k: int = _MOE.top_k
    router: str = _MOE.router
    prompts_per_expert: int = _MOE.prompts_per_expert
    router_steps: int = 0
    router_lr: float = _ROUTERS.lr
    router_examples_per_task: int = _ROUTERS.examples_per_task
    router_dtype: str = _MOE.router_dtype  # LoRA-MoE only (moe-lora)
    router_init: str = _MOE.router_init
    # training methods (the paper's recipe: one constant learning rate)
    finetune: str = "lora"
    lr: float = PAPER_LR
    epochs: float = _TRAINING.epochs
    train_batch_size: int = _TRAINING.batch_size
    micro_batch_size: int = _TRAINING.micro_batch_size
    max_length: int = _TRAINING.max_length
    lora_r: int = _TRAINING.lora.r
    lora_alpha: float = _TRAINING.lora.alpha
    olora_lambda: float = OLoraConfig().lambdas[0]
    replay_fraction: float = ReplayConfig().fraction
    joint_sampling: str = JointConfig().sampling
    # search (compose --search): evaluations, and the old-knowledge loss allowed, in percent of the base's
    trials: int = SearchConfig().trials
    max_old_loss: float = SearchConfig().max_old_loss
    seed: int = 0

    def __post_init__(self) -> None:
        # epochs=1 and epochs=1.0 are one setting: the same version key either way.
        for option in fields(self):
            if option.type in ("float", float):
                object.__setattr__(self, option.name, float(getattr(self, option.name)))


@dataclass(frozen=True)
class Build:
    """What a method builds from: the base and the chosen contributions as loadable dirs, and their tasks."""

    reg: Registry
    base_dir: Path
    inputs: list[Path]
    names: list[str]
    tasks: list[RegisteredTask]
    options: ComposeOptions
    work: Path
    say: Callable[[str], None]
    start: Path | None = None  # --from: the version built upon, as its dir (a model, or a plain LoRA adapter)
    start_is_adapter: bool = False
    start_name: str | None = None
    replayed: tuple[RegisteredTask, ...] = ()  # --from with replay: the start's tasks whose data is kept
    launch: LaunchSpec | None = None  # training and router training as `accelerate launch` of N processes
    statistics: tuple[Path | None, ...] = ()  # each input's contributed statistics dir, where it has one

    @property
    def out(self) -> Path:
        return self.work / MODEL_DIR
