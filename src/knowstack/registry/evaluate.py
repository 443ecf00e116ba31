"""Scoring what a registry holds: a version on its registered tasks (new knowledge) and on the base's
old-knowledge tasks, always from the stored, verified copies of weights and task files.

Each registered task is the task of the earliest contribution that brought it (a task name is one task);
its one score is the metric it was registered with (math: chain-of-thought exact match).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.registry.core import Registry
from knowstack.registry.store import ObjectStore

# The old-knowledge metric averaged into AVE when a task reports several (lm-eval: acc, acc_norm).
OLD_METRIC = "acc"


@dataclass(frozen=True)
class RegisteredTask:
    name: str
    task_format: str
    metric: str
    files: dict[str, dict[str, Any]]  # split -> {file, sha256, n}
    contributor: str

    @property
    def score_metric(self) -> str:
        return "em_cot" if self.metric == "math" else self.metric

    def has(self, split: str) -> bool:
        return split in self.files

    def load(self, store: ObjectStore, split: str) -> list[Example]:
        """The split's examples, read from its verified stored copy."""
        from knowstack.data.tasks import read_split

        if split not in self.files:
            raise KnowstackError(f"task '{self.name}' has no {split} split in the registry (contributed by "
                                 f"'{self.contributor}'{' without --keep-data' if split == 'train' else ''})")
        entry = self.files[split]
        with store.view({entry["file"]: entry["sha256"]}) as folder:
            return read_split(self.task_format, split, folder / entry["file"])


def task_of(record: dict[str, Any]) -> RegisteredTask:
    """The task a contribution record brought."""
    return RegisteredTask(record["task"], record["task_format"], record["metric"], record["task_files"],
                          record["name"])


def registered_tasks(records: Sequence[dict[str, Any]]) -> dict[str, RegisteredTask]:
    """Every task of the registry's contributions, by name, in the order they were first contributed."""
    tasks: dict[str, RegisteredTask] = {}
    for record in records:
        if record["method"] == "contribution" and record["task"] not in tasks:
            tasks[record["task"]] = task_of(record)
    return tasks


def score_task(model: Any, tokenizer: Any, store: ObjectStore, task: RegisteredTask, batch_size: int) -> dict[str, Any]:
    """The model's score row on the task's test split."""
    from knowstack.evaluate.new_knowledge import evaluate_task

    examples = task.load(store, "test")
    score = evaluate_task(model, tokenizer, examples, task.metric, batch_size=batch_size)
    return {"task": task.name, "kind": "new", "metric": task.score_metric, "value": score.scores[task.score_metric],
            "n": len(examples), "items": score.per_example[task.score_metric]}


def old_knowledge_rows(model: Any, tokenizer: Any, tasks: Sequence[str], include_path: Path | None,
                       batch_size: int, limit: int | None) -> list[dict[str, Any]]:
    """The model's lm-eval scores as score rows, through knowstack's own harness bridge, each with its per-document
    scores ("items") where the harness logged them."""
    from knowstack.evaluate.old_knowledge import evaluate_old_knowledge_items

    results, per_doc = evaluate_old_knowledge_items(model, tokenizer, list(tasks), include_path=include_path,
                                                    batch_size=batch_size, limit=limit)
    missing = [task for task in tasks if task not in results]
    if missing:
        raise KnowstackError(f"lm-eval returned no scores for {', '.join(missing)}", field="old_knowledge")
    return [{"task": task, "kind": "old", "metric": metric, "value": value, "n": None,
             **({"items": per_doc[task][metric]} if metric in per_doc.get(task, {}) else {})}
            for task in tasks for metric, value in sorted(results[task].items())]


def item_scores(scores: Sequence[dict[str, Any]], tasks: dict[str, RegisteredTask]) -> dict[str, list[float]]:
    """The per-item scores the gate compares: "old/<task>" (the metric AVE reads) and "new/<task>" (each registered
    task's one score), of the rows that carry them."""
    out: dict[str, list[float]] = {}
    old_metric: dict[str, str] = {}
    for row in scores:
        if row["kind"] == "old" and (row["task"] not in old_metric or row["metric"] == OLD_METRIC):
            old_metric[row["task"]] = row["metric"]
    for row in scores:
        if "items" not in row:
            continue
        if row["kind"] == "old" and old_metric.get(row["task"]) == row["metric"]:
            out[f"old/{row['task']}"] = row["items"]
        elif row["kind"] == "new" and row["task"] in tasks and row["metric"] == tasks[row["task"]].score_metric:
            out[f"new/{row['task']}"] = row["items"]
    return out


def without_items(scores: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score rows as the records keep them (per-item scores are kept apart, in the version's settings)."""
    return [{k: v for k, v in row.items() if k != "items"} for row in scores]


def old_knowledge_of(reg: Registry, model: Any, tokenizer: Any, batch_size: int) -> list[dict[str, Any]]:
    """Old-knowledge rows for `model` on the tasks the base was scored on at init, from the stored task
    files and with the same example limit, so they compare with the base's."""
    old = reg.base()["settings"].get("old_knowledge")
    if not old:
        return []
    files = old.get("files") or {}
    with contextlib.ExitStack() as stack:
        include = stack.enter_context(reg.store.view(files)) if files else None
        return old_knowledge_rows(model, tokenizer, old["tasks"], include, batch_size, old.get("limit"))


def load_for_scoring(model_dir: Path, base_dir: Path | None = None) -> Any:
    """A model to score, in float32, on the GPU where it fits: the full model in `model_dir`, or, with `base_dir`,
    the base with the adapter or LoRA-MoE in `model_dir` applied."""
    from knowstack.modelio import load_model, on_gpu_if_it_fits

    if base_dir is None:
        return on_gpu_if_it_fits(load_model(model_dir, dtype="float32"))
    return on_gpu_if_it_fits(load_model(base_dir, model_dir, dtype="float32"))


def old_scores(scores: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """{(task, metric): value} of the old-knowledge rows."""
    return {(row["task"], row["metric"]): row["value"] for row in scores if row["kind"] == "old"}


def average(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def old_average(scores: Sequence[dict[str, Any]]) -> float | None:
    """AVE: the mean old-knowledge score over tasks (acc where a task reports it, else its one metric)."""
    by_task: dict[str, dict[str, float]] = {}
    for (task, metric), value in old_scores(scores).items():
        by_task.setdefault(task, {})[metric] = value
    return average([metrics.get(OLD_METRIC, next(iter(metrics.values()))) for metrics in by_task.values()])


def new_scores(scores: Sequence[dict[str, Any]], tasks: dict[str, RegisteredTask]) -> dict[str, float]:
    """{task: value} of each registered task's one score."""
    return {row["task"]: row["value"] for row in scores
            if row["kind"] == "new" and row["task"] in tasks and row["metric"] == tasks[row["task"]].score_metric}


def new_average(scores: Sequence[dict[str, Any]], tasks: dict[str, RegisteredTask]) -> float | None:
    """AVnew over the registered tasks; None unless every one has a score."""
    values = new_scores(scores, tasks)
    return average(list(values.values())) if set(values) == set(tasks) and tasks else None
