"""A study's results as rows (results.py's schema), read from its finished evaluation steps' artifacts:
the rows and their intervals, the per-item scores, O-LoRA's logged penalties, and what the report needs of the
plan (StudyInfo, study.json). The runner writes them all into the study dir at its end; while a study runs,
`current_rows` / `current_items` / `current_costs` read the evaluations finished so far."""

from __future__ import annotations

import json
from pathlib import Path

from knowstack.results import (
    COSTS_CSV,
    OLD_PROTOCOL,
    PER_EXAMPLE,
    Cost,
    ItemKey,
    Items,
    Row,
    StudyInfo,
    planned_rows,
    read_costs_csv,
    read_csv,
    read_items,
)
from knowstack.study.costs import collect_costs
from knowstack.study.plan import Plan


def collect_rows(plan: Plan, artifacts: Path) -> list[Row]:
    """Rows for every evaluation whose step has finished, in plan order, each with its items' interval."""
    rows: list[Row] = []
    for ev in plan.evaluations:
        out = artifacts / ev.step
        if not out.is_dir():
            continue
        common = {"model": ev.model, "method": ev.method, "finetune": ev.finetune, "stage": ev.stage,
                  "trained_on": ev.trained_on, "point": ev.point, "settings": ev.settings, "seed": ev.seed}
        items = _step_items(out)
        for task in plan.task_names:
            record = json.loads((out / f"new-{task}.json").read_text())
            # An evaluation made before protocols were recorded was scored the built-in way.
            protocol = record.get("protocol", "builtin")
            for metric, value in record["scores"].items():
                ci = _interval(items, "new", task, metric)
                rows.append(Row(task=task, kind="new", metric=metric, value=value, n=record["n"], protocol=protocol,
                                **ci, **common))
        old = json.loads((out / "old.json").read_text())
        for task, metrics in old.items():
            for metric, value in metrics.items():
                ci = _interval(items, "old", task, metric)
                rows.append(Row(task=task, kind="old", metric=metric, value=value, n=None, protocol=OLD_PROTOCOL,
                                **ci, **common))
    return rows


def _step_items(out: Path) -> dict:
    from knowstack.study.steps import PER_EXAMPLE_FILE

    path = out / PER_EXAMPLE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _interval(items: dict, kind: str, task: str, metric: str) -> dict[str, float | None]:
    from knowstack.stats import mean_interval

    scores = items.get(kind, {}).get(task, {}).get(metric)
    ci = mean_interval(scores, f"{kind}/{task}") if scores else None
    return {"ci_low": ci[0], "ci_high": ci[1]} if ci else {"ci_low": None, "ci_high": None}


def collect_items(plan: Plan, artifacts: Path) -> Items:
    """(model, kind, task, metric) -> {seed: per-item scores in test order} of every finished evaluation."""
    found: dict[ItemKey, dict[int | None, list[float]]] = {}
    for ev in plan.evaluations:
        out = artifacts / ev.step
        if not out.is_dir():
            continue
        for kind, tasks in _step_items(out).items():
            for task, metrics in tasks.items():
                for metric, scores in metrics.items():
                    found.setdefault((ev.model, kind, task, metric), {})[ev.seed] = scores
    return found


def olora_penalties(plan: Plan, artifacts: Path) -> dict[str, dict]:
    """For each O-LoRA model, the penalty its own round logged (first and last step): the train step
    behind it is found through the merge step the model was evaluated from."""
    out: dict[str, dict] = {}
    for ev in plan.evaluations:
        if ev.method != "olora":
            continue
        merged = plan.steps[ev.step].params["model"]["model"]
        merge = plan.steps.get(merged[1:].split("/", 1)[0]) if merged.startswith("@") else None
        if merge is None or merge.kind != "merge-adapter":
            continue
        summary_path = artifacts / merge.params["adapter"][1:] / "train_summary.json"
        if not summary_path.is_file():
            continue
        record = json.loads(summary_path.read_text()).get("olora")
        if record:
            out[ev.model] = {"stage": ev.stage, "lambda": record["lambda"], "first": record["penalty_first"],
                             "last": record["penalty_last"], "steps": len(record["penalty_curve"])}
    return out


def search_records(plan: Plan, artifacts: Path) -> dict[str, dict]:
    """For each searched model, its search's record (search.json beside the chosen merge), once the search ran."""
    from knowstack.study.steps import SEARCH_FILE

    out: dict[str, dict] = {}
    for ev in plan.evaluations:
        if ev.method != "search":
            continue
        made_by = plan.steps[ev.step].params["model"]["model"]
        path = artifacts / made_by[1:].split("/", 1)[0] / SEARCH_FILE
        if path.is_file():
            out[ev.model] = json.loads(path.read_text())
    return out


def study_info(plan: Plan, artifacts: Path) -> StudyInfo:
    """What the report reads of the plan (study.json): title, task order, old metric, planned evaluations,
    O-LoRA's penalties and the searches' records so far."""
    config = plan.config
    return StudyInfo(title=config.name, task_order=list(plan.task_names), old_metric=config.old_knowledge.metric,
                     planned=planned_rows(plan.evaluations), penalties=olora_penalties(plan, artifacts),
                     searches=search_records(plan, artifacts))


def current_rows(plan: Plan, out: Path) -> list[Row]:
    """A study dir's results: results.csv, or, while a study is still running (results.csv is written at its
    end), the rows of the evaluations finished so far, read from their result files."""
    csv_path, artifacts = out / "results.csv", out / "artifacts"
    written = read_csv(csv_path) if csv_path.is_file() else []
    live = collect_rows(plan, artifacts) if artifacts.is_dir() else []
    return live if len(live) > len(written) else written


def current_items(plan: Plan, out: Path) -> Items:
    """A study dir's per-item scores: per_example.jsonl (written with results.csv), or the finished evaluations'."""
    written = read_items(out / PER_EXAMPLE)
    live = collect_items(plan, out / "artifacts") if (out / "artifacts").is_dir() else {}
    return live if len(live) > len(written) else written


def current_costs(plan: Plan, out: Path) -> list[Cost]:
    """A study dir's costs: costs.csv (written with results.csv), or the finished steps' while it runs."""
    written = read_costs_csv(out / COSTS_CSV)
    live = collect_costs(plan, out / "artifacts") if (out / "artifacts").is_dir() else []
    return live if len(live) > len(written) else written
