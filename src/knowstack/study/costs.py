"""What each evaluated model cost to make (results.py's Cost, costs.csv): its steps' seconds, examples, peak
memory and disk, read from the finished steps' step.json ("cost") and train_summary.json and summed along the model's
lineage (every step it was made from, back to the base)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from knowstack.results import Cost
from knowstack.study.plan import Evaluation, Plan
from knowstack.study.shared_cache import reused_keys
from knowstack.study.steps import STEP_FILE
from knowstack.usage import dir_bytes

# The steps that make a model; the world (the built-in base) and evaluations are not part of any model's cost.
MAKING = ("train", "merge-adapter", "merge", "moe", "statistics", "gate")  # statistics: what regmean / fisher read
SUMMARY_FILE = "train_summary.json"  # train/loop.py's, named here so that reading costs does not import torch


def lineage(plan: Plan, key: str) -> list[str]:
    """Every model-making step `key` depends on, transitively, in plan order (each once)."""
    found: set[str] = set()
    todo = [key]
    while todo:
        for dep in plan.steps[todo.pop()].deps:
            if dep not in found:
                found.add(dep)
                todo.append(dep)
    return [k for k in plan.steps if k in found and plan.steps[k].kind in MAKING]


def collect_costs(plan: Plan, artifacts: Path) -> list[Cost]:
    """A Cost for every evaluation whose step has finished, in plan order."""
    reused = reused_keys(artifacts)
    return [model_cost(plan, artifacts, ev, reused) for ev in plan.evaluations if (artifacts / ev.step).is_dir()]


def model_cost(plan: Plan, artifacts: Path, ev: Evaluation, reused: set[str] | frozenset[str] = frozenset()) -> Cost:
    """reused: the study's steps linked from the shared step cache (shared_cache.reused_keys)."""
    steps = lineage(plan, ev.step)
    costs = [(_read(artifacts / key / STEP_FILE) or {}).get("cost") for key in steps]
    summaries = [_read(artifacts / key / SUMMARY_FILE) for key in steps if plan.steps[key].kind == "train"]
    measured = all(c is not None for c in costs)
    peaks = [c.get("peak_host_bytes") for c in costs if c] + [s.get("peak_host_bytes") for s in summaries if s]
    gpu = [p for p in [c.get("peak_gpu_bytes") for c in costs if c] + [s.get("peak_gpu_bytes") for s in summaries if s]
           if p is not None]
    scopes = {c.get("peak_host_scope") for c in costs if c} | {s.get("peak_host_scope") for s in summaries if s}
    have_summaries = all(s is not None for s in summaries)
    return Cost(
        model=ev.model, method=ev.method, finetune=ev.finetune, stage=ev.stage, trained_on=ev.trained_on,
        seed=ev.seed, point=ev.point, steps=len(steps),
        train_seconds=round(sum(s["seconds"] for s in summaries), 3) if have_summaries else None,
        seconds=round(sum(c["seconds"] for c in costs), 3) if measured else None,
        examples=sum(s["examples"] for s in summaries) if have_summaries else None,
        peak_host_bytes=max(p for p in peaks if p is not None) if measured and steps and None not in peaks else None,
        peak_host_scope="process" if "process" in scopes else "step" if measured and steps else "",
        peak_gpu_bytes=max(gpu) if measured and gpu else None,
        disk_bytes=_evaluated_bytes(plan, artifacts, ev),
        reused_steps=len(reused & {*steps, ev.step}),
    )


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _evaluated_bytes(plan: Plan, artifacts: Path, ev: Evaluation) -> int | None:
    """The disk size of what the evaluation loads beyond the base: the step outputs its model reference names
    (a model or an adapter; the world's base model is not counted); None for the base itself."""
    ref = plan.steps[ev.step].params.get("model", {})
    sizes = []
    for value in (ref.get("model"), ref.get("adapter")):
        if not value or not value.startswith("@"):
            continue
        key, _, sub = value[1:].partition("/")
        if plan.steps[key].kind in MAKING:
            path = artifacts / key / sub if sub else artifacts / key
            sizes.append(dir_bytes(path) if path.exists() else None)
    return None if not sizes or None in sizes else sum(sizes)
