"""A study step's tracker run (train/tracking.py): its project (the study), its run (the step) and its tags,
the methods, tasks and rounds of the models it makes or scores, found in the plan's evaluations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from knowstack.config import StudyConfig
from knowstack.study.plan import Plan, Step, build_plan
from knowstack.train.tracking import Tracking

MLRUNS_DIR = "mlruns"


def step_tracking(step: Step, config: StudyConfig, out: Path, plan: Plan | None = None) -> Tracking | None:
    """The tracker run of `step` of the study `config` in the study dir `out`; None when the study reports to no
    tracker."""
    report_to = config.training.report_to
    if not report_to:
        return None
    plan = plan or build_plan(config, out)
    return Tracking(tuple(report_to), project=config.name, run=step.label, tags=step_tags(step, plan),
                    mlflow_dir=str(out / MLRUNS_DIR))


def step_tags(step: Step, plan: Plan) -> dict[str, str]:
    """study, step, kind, finetune, task(s); method(s) and round(s) of the evaluations of what the step makes (a
    train step) or scores (an eval step). One step may serve several methods: the tags list them all."""
    made = {step.key} | {s.key for s in plan.steps.values() if s.kind == "merge-adapter" and step.key in s.deps}
    evaluations = [e for e in plan.evaluations
                   if e.step == step.key or made & set(plan.steps[e.step].deps)]
    params: dict[str, Any] = step.params
    tasks = [params["task"]["name"]] if "task" in params else [t["name"] for t in params.get("tasks", [])]
    tags = {"study": plan.config.name, "step": step.label, "kind": step.kind,
            "method": _joined(e.method for e in evaluations),
            "round": _joined(str(e.stage) for e in evaluations if e.stage is not None),
            "task": _joined(tasks) or _joined(e.trained_on for e in evaluations),
            "finetune": str(params.get("finetune") or _joined(e.finetune for e in evaluations))}
    return {key: value for key, value in tags.items() if value}


def _joined(values: Any) -> str:
    return ",".join(dict.fromkeys(v for v in values if v))
