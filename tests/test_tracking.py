"""Experiment trackers: a training run with report_to [tensorboard] leaves event files holding its loss, learning
rate, throughput and O-LoRA penalty per step (read back with TensorBoard's own reader); a study reports each
training and evaluation, tagged with study, method, task and round, without changing any step's cache key; a
tracker that is not installed is one clear error before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_modelcard import EXAMPLES
from test_registry import make_task, write_mc_task

from knowstack.config import load_config
from knowstack.errors import KnowstackError
from knowstack.study.plan import build_plan
from knowstack.study.runner import run_study
from knowstack.study.tracking import step_tags
from knowstack.train.launch import TrainJob, run_job
from knowstack.train.tracking import TRACKING_DIR, Tracking, check_trackers

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="tensorboard missing: pip install -e '.[dev]'")

SETTINGS = {"finetune": "lora", "lr": 1e-3, "max_steps": 3, "batch_size": 2, "micro_batch_size": 2,
            "max_length": 32, "lora_r": 2, "lora_alpha": 4}


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under `folder`, as TensorBoard reads the event files."""
    series: dict[str, list[tuple[int, float]]] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = event_accumulator.EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return series


def test_a_training_run_logs_every_step_to_tensorboard(tmp_path: Path, tiny_model_dir: Path) -> None:
    tracking = Tracking(("tensorboard",), project="unit", run="first", tags={"task": "toy"})
    examples = [(ex.prompt, ex.answer) for ex in EXAMPLES]
    first = run_job(TrainJob(str(tiny_model_dir), str(tmp_path / "first"), SETTINGS, examples,
                             tracking=tracking.to_dict()))
    logged = scalars(tmp_path / "first" / TRACKING_DIR)
    assert [step for step, _ in logged["train/loss"]] == [1, 2, 3]
    assert [v for _, v in logged["train/loss"]] == pytest.approx(first["loss_curve"], rel=1e-6)
    assert [v for _, v in logged["train/lr"]] == pytest.approx(first["lr_curve"], rel=1e-6)
    assert all(v > 0 for _, v in logged["train/tokens_per_second"])
    assert "train/olora_penalty" not in logged
    assert not list(tmp_path.glob(".*tracking"))  # the staging dir was moved into the artifact

    # O-LoRA against the first adapter: its penalty per step too
    second = run_job(TrainJob(str(tiny_model_dir), str(tmp_path / "second"), SETTINGS, examples,
                              olora={"previous": [str(tmp_path / "first")], "lambda": 0.5},
                              tracking=Tracking(("tensorboard",), run="second").to_dict()))
    penalty = scalars(tmp_path / "second" / TRACKING_DIR)["train/olora_penalty"]
    assert [v for _, v in penalty] == pytest.approx(second["extra_loss_curve"], rel=1e-6)


def test_a_tracker_that_is_not_installed_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(KnowstackError, match=r"'mlflow' is not installed: pip install 'knowstack\[tracking\]'"):
        check_trackers(["tensorboard", "mlflow"])
    with pytest.raises(KnowstackError, match="unknown tracker 'neptune'"):
        Tracking(("neptune",))


def tiny_study(tmp_path: Path, model: Path, report_to: list[str]) -> Path:
    write_mc_task(tmp_path / "old")
    task = make_task(tmp_path / "tasks", "Stance", n=4)
    config = {"name": "tracked", "base": {"model": str(model)},
              "tasks": [{"name": "Stance", "path": str(task), "metric": "accuracy"}],
              "old_knowledge": {"tasks": ["ks_toy"], "include_path": str(tmp_path / "old")},
              "training": {"lr": 1e-3, "batch_size": 2, "micro_batch_size": 2, "max_length": 32,
                           "lora": {"r": 2, "alpha": 4}, "report_to": report_to},
              "evaluation": {"batch_size": 4, "max_new_tokens": {"accuracy": 4}},
              "methods": {"sequential": {"finetune": ["lora"]}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_study_reports_training_and_evaluation_tagged_without_changing_cache_keys(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    path = tiny_study(tmp_path, tiny_model_dir, ["tensorboard"])
    tracked = load_config(path)
    untracked = yaml.safe_load(path.read_text())
    untracked["training"]["report_to"] = []
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(untracked))
    plain = load_config(tmp_path / "plain.yaml")
    plan = build_plan(tracked)
    assert [s.key for s in plan.ordered()] == [s.key for s in build_plan(plain).ordered()]

    run_study(tracked, tmp_path / "run")
    train_step = next(s for s in plan.ordered() if s.kind == "train")
    tags = step_tags(train_step, plan)
    assert tags["study"] == "tracked" and tags["method"] == "sequential" and tags["task"] == "Stance"
    assert tags["round"] == "1" and tags["finetune"] == "lora"
    artifact = tmp_path / "run" / "artifacts" / train_step.key
    assert len(scalars(artifact / TRACKING_DIR)["train/loss"]) == json.loads(
        (artifact / "train_summary.json").read_text())["steps"]
    stored = yaml.safe_load(next((artifact / TRACKING_DIR).rglob("hparams.yml")).read_text())
    assert stored["tag/method"] == "sequential" and stored["lora_r"] == 2
    for step in (s for s in plan.ordered() if s.kind == "eval"):
        logged = scalars(tmp_path / "run" / "artifacts" / step.key / TRACKING_DIR)
        scores = json.loads((tmp_path / "run" / "artifacts" / step.key / "new-Stance.json").read_text())["scores"]
        assert logged["new/Stance/accuracy"] == [(0, pytest.approx(scores["accuracy"]))]
        assert "old/ks_toy/acc" in logged
