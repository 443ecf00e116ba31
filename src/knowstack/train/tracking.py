"""Experiment trackers (TensorBoard, MLflow, Weights & Biases) through accelerate's tracker integration.

`training.report_to: [tensorboard, mlflow, wandb]` (none by default) makes every training run log its loss,
learning rate, O-LoRA penalty and throughput per optimizer step, and every evaluation its scores, each run
tagged with the study, step, method(s), task(s) and round(s). Everything is offline by default:
- TensorBoard: event files in the step's artifact dir, `tracking/<project>/`;
- MLflow: a file store, the study's `mlruns/` (`./mlruns` outside a study), unless MLFLOW_TRACKING_URI is set;
- wandb: mode offline (WANDB_MODE overrides), its files in the artifact's `tracking/`.

Tracking does not change what is computed, so it is not part of a step's cache key: it travels beside the
training settings (TrainJob.tracking), never inside them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from knowstack.errors import KnowstackError

TRACKERS = ("tensorboard", "mlflow", "wandb")
TRACKING_DIR = "tracking"  # inside an artifact: where its trackers' local files end up
# What each tracker needs installed, and the extra that installs it.
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


@dataclass(frozen=True)
class Tracking:
    """Which trackers, the project (the study's name) and run (the step's label), tags, and the MLflow store."""

    report_to: tuple[str, ...]
    project: str = "knowstack"
    run: str = "train"
    tags: dict[str, str] = field(default_factory=dict)
    mlflow_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "report_to", tuple(self.report_to))
        check_trackers(self.report_to)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "report_to": list(self.report_to)}


def check_trackers(report_to: Sequence[str], where: str = "training.report_to") -> None:
    """Unknown names and trackers that are not installed: one clear error, before anything runs."""
    for name in report_to:
        if name not in TRACKERS:
            raise KnowstackError(f"unknown tracker '{name}': choose from {', '.join(TRACKERS)}", field=where)
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise KnowstackError(f"'{name}' is not installed: pip install 'knowstack[tracking]' (or pip install "
                                 f"{_MODULES[name]})", field=where)


def staging_dir(out_dir: str | Path) -> Path:
    """Where trackers write while a run is under way: beside its output, which does not exist until it is whole."""
    out = Path(out_dir)
    return out.with_name(f".{out.name}.tracking")


def accelerator_kwargs(tracking: Tracking | None, logging_dir: Path) -> dict[str, Any]:
    if tracking is None or not tracking.report_to:
        return {}
    return {"log_with": list(tracking.report_to), "project_dir": str(logging_dir)}


def start(accelerator: Any, tracking: Tracking | None, config: Mapping[str, Any], logging_dir: Path) -> None:
    """init_trackers with the run's settings and tags (a no-op without trackers)."""
    if tracking is None or not tracking.report_to:
        return
    if accelerator.is_main_process and logging_dir.is_dir():
        shutil.rmtree(logging_dir)  # left by a run that was killed: its steps are not this run's
    kwargs: dict[str, Any] = {}
    if "mlflow" in tracking.report_to:
        _use_local_mlflow(tracking.mlflow_dir)
        kwargs["mlflow"] = {"run_name": tracking.run, "tags": tracking.tags}
    if "wandb" in tracking.report_to:
        os.environ.setdefault("WANDB_MODE", "offline")
        logging_dir.mkdir(parents=True, exist_ok=True)
        kwargs["wandb"] = {"name": tracking.run, "dir": str(logging_dir), "tags": sorted(set(tracking.tags.values())),
                           "mode": os.environ["WANDB_MODE"]}
    accelerator.init_trackers(tracking.project, config=hparams(config, tracking.tags), init_kwargs=kwargs)


def _use_local_mlflow(mlflow_dir: str | None) -> None:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return  # the user's own server or store
    import mlflow

    mlflow.set_tracking_uri(Path(mlflow_dir or "mlruns").resolve().as_uri())


def hparams(config: Mapping[str, Any], tags: Mapping[str, str]) -> dict[str, Any]:
    """Flat bool/int/float/str values, as TensorBoard's hparams and MLflow's params take them."""
    flat: dict[str, Any] = {f"tag/{k}": v for k, v in tags.items()}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}/{k}": v for k, v in hparams(value, {}).items()})
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[key] = value if value is not None else "none"
        else:
            flat[key] = str(value)
    return flat


def finish(accelerator: Any, tracking: Tracking | None) -> None:
    if tracking is not None and tracking.report_to:
        accelerator.end_training()


def move_into(logging_dir: Path, artifact: Path) -> None:
    """The trackers' local files into the artifact being written (its temporary dir)."""
    if logging_dir.is_dir():
        shutil.move(str(logging_dir), str(artifact / TRACKING_DIR))


def log_scores(tracking: Tracking | None, artifact: Path, scores: Mapping[str, float]) -> None:
    """An evaluation's scores as one logged step of its own run (the eval step's), written into `artifact`."""
    if tracking is None or not tracking.report_to or not scores:
        return
    from accelerate import Accelerator

    logging_dir = artifact / TRACKING_DIR
    accelerator = Accelerator(**accelerator_kwargs(tracking, logging_dir))
    start(accelerator, tracking, {}, logging_dir)
    accelerator.log(dict(scores), step=0)
    finish(accelerator, tracking)
