"""Scoring what a registry holds: a version on its registered tasks (new knowledge) and on the base's
old-knowledge tasks, always from the stored, verified copies of weights and task files.

A registry scores through the study's evaluation step (study/steps.py `run_eval`), run in a small study dir of its
own: a version is scored exactly as a study with `evaluation.protocol` set to the registry's protocol (recorded at
`registry init`, default the study's) scores the same model on the same task files, into the same results rows
(study/results.py `collect_rows`: task, kind, metric, value, n, protocol) and the same per-item scores. Each
registered task is the task of the earliest contribution that brought it (a task name is one task); the one score
the gate and AVnew read of it is its metric's last declared scoring under the protocol (evaluate/protocols.py
`summary_metric`; math: chain-of-thought exact match).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knowstack.config import DEFAULT_OLD_METRIC, TASK_NAME_PATTERN, OldKnowledgeConfig
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.registry.core import Registry, registry_protocol
from knowstack.registry.db import DEFAULT_PROTOCOL
from knowstack.registry.store import ObjectStore

# The old-knowledge metric averaged into AVE when a task reports several (lm-eval: acc, acc_norm).
OLD_METRIC = DEFAULT_OLD_METRIC
# A registered task's splits as a study task's file fields.
SPLIT_FIELDS = {"train": "train_file", "eval": "eval_file", "test": "test_file"}


@dataclass(frozen=True)
class RegisteredTask:
    name: str
    task_format: str
    metric: str
    files: dict[str, dict[str, Any]]  # split -> {file, sha256, n}
    contributor: str
    protocol: str = DEFAULT_PROTOCOL  # the registry's: how its scores are made

    @property
    def score_metric(self) -> str:
        from knowstack.evaluate.protocols import summary_metric

        return summary_metric(self.protocol, self.metric)

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

    def study_task(self, store: ObjectStore, folder: Path, name: str | None = None) -> dict[str, Any]:
        """The task as a study config's task entry (named `name`, default its own name): its stored splits laid out
        (linked, verified) in `folder`, a path that stays the same so the steps that read them keep their keys."""
        laid = store.lay_out({entry["file"]: entry["sha256"] for entry in self.files.values()}, folder)
        files = {SPLIT_FIELDS[split]: str(laid / entry["file"]) for split, entry in self.files.items()
                 if split in SPLIT_FIELDS}
        return {"name": name or self.name, "format": self.task_format, "metric": self.metric, **files}


def task_of(record: dict[str, Any], protocol: str = DEFAULT_PROTOCOL) -> RegisteredTask:
    """The task a contribution record brought, scored under the registry's `protocol`."""
    return RegisteredTask(record["task"], record["task_format"], record["metric"], record["task_files"],
                          record["name"], protocol)


def registered_tasks(records: Sequence[dict[str, Any]]) -> dict[str, RegisteredTask]:
    """Every task of the registry's contributions, by name, in the order they were first contributed."""
    protocol = registry_protocol(records)
    tasks: dict[str, RegisteredTask] = {}
    for record in records:
        if record["method"] == "contribution" and record["task"] not in tasks:
            tasks[record["task"]] = task_of(record, protocol)
    return tasks


def own_score(record: dict[str, Any], protocol: str = DEFAULT_PROTOCOL) -> dict[str, Any] | None:
    """A contribution's score row on its own task: the task's one score (RegisteredTask.score_metric)."""
    metric = task_of(record, protocol).score_metric
    return next((s for s in record["scores"] if s["kind"] == "new" and s["task"] == record["task"]
                 and s["metric"] == metric), None)


# --- scoring through the study's evaluation step -------------------------------------------------------------
def stored_old_knowledge(reg: Registry, folder: Path, batch_size: int) -> OldKnowledgeConfig | None:
    """The old knowledge the base was scored on at init, as the study's config section: its tasks, its example limit,
    and its stored task files laid out in `folder` (a path that stays the same: the evaluation step's key names it),
    so that every later score compares with the base's."""
    old = reg.base()["settings"].get("old_knowledge")
    if not old:
        return None
    files = old.get("files") or {}
    include = reg.store.lay_out(files, folder) if files else None
    return OldKnowledgeConfig(tasks=list(old["tasks"]), include_path=include, limit=old.get("limit"),
                              batch_size=batch_size, **reg.harness)


def evaluation_config(base_dir: Path, tasks: Sequence[dict[str, Any]], old: OldKnowledgeConfig | None,
                      protocol: str, batch_size: int, harness: dict[str, Any] | None = None) -> Any:  # -> StudyConfig
    """The study config a registry scores with: the registry's base (and its tokenizer, which contributions are
    stored without), the tasks as study task entries, the old knowledge (none: no old-knowledge scores), the
    registry's protocol, lm-eval's BOS setting (harness, Registry.harness) and the evaluation batch."""
    from knowstack.config import StudyConfig

    return StudyConfig.model_validate({
        "name": "registry-evaluation",
        "base": {"model": str(base_dir), "tokenizer": str(base_dir)},
        "tasks": list(tasks),
        "old_knowledge": old if old is not None else {"tasks": []},
        "evaluation": {"protocol": protocol, "batch_size": batch_size, **evaluation_harness(harness)},
    })


def evaluation_harness(harness: dict[str, Any] | None) -> dict[str, Any]:
    """The evaluation section's share of a registry's lm-eval settings: add_bos_token, where given."""
    return {"add_bos_token": harness["add_bos_token"]} if harness and "add_bos_token" in harness else {}


def score_model(work: Path, base_dir: Path, model: Path, adapter: Path | None, tasks: Sequence[dict[str, Any]],
                old: OldKnowledgeConfig | None, *, protocol: str, batch_size: int,
                harness: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The score rows of `model` (with `adapter` on it, where given) on `tasks` (study task entries) and `old`, each
    with its per-item scores ("items", where the step kept them): the study's evaluation step run in the study dir
    `work`, where a killed scoring resumes at its next task and a finished one is read back, not run again."""
    from knowstack.study.builder import PlanBuilder
    from knowstack.study.graph import ModelRef
    from knowstack.study.results import collect_rows
    from knowstack.study.steps import PER_EXAMPLE_FILE, StudyContext, execute

    tasks, registry_name = study_names(tasks)
    config = evaluation_config(base_dir, tasks, old, protocol, batch_size, harness)
    builder = PlanBuilder(config, work)
    builder.evaluate(ModelRef(str(model), str(adapter) if adapter is not None else None), "version", "registry", "",
                     None)
    plan = builder.plan
    [evaluation] = plan.evaluations
    artifact = execute(plan.steps[evaluation.step], StudyContext(work, config))
    items = json.loads((artifact / PER_EXAMPLE_FILE).read_text(encoding="utf-8"))
    rows = [{"task": registry_name.get(row.task, row.task) if row.kind == "new" else row.task, "kind": row.kind,
             "metric": row.metric, "value": row.value, "n": row.n, "protocol": row.protocol,
             **_items_of(items, row.kind, row.task, row.metric)}
            for row in collect_rows(plan, work / "artifacts")]
    missing = [task for task in (old.tasks if old is not None else []) if not any(r["task"] == task for r in rows)]
    if missing:
        raise KnowstackError(f"lm-eval returned no scores for {', '.join(missing)}", field="old_knowledge")
    return rows


def study_names(tasks: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The tasks under names a study takes (config.py TASK_NAME_PATTERN), and {study name: registry name} of those
    renamed: a registry's task is named by its dir, which may hold other characters (a space); each is replaced by
    '_' (and '_' added while the name is another task's). A name that fits is kept, and so is its steps' key."""
    taken = {task["name"] for task in tasks}
    renamed, registry_name = [], {}
    for task in tasks:
        name = task["name"]
        if not re.fullmatch(TASK_NAME_PATTERN, name):
            alias = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            while alias in taken:
                alias += "_"
            taken.add(alias)
            registry_name[alias] = name
            task = {**task, "name": alias}
        renamed.append(task)
    return renamed, registry_name


def _items_of(items: dict[str, Any], kind: str, task: str, metric: str) -> dict[str, list[float]]:
    scores = items.get(kind, {}).get(task, {}).get(metric)
    return {"items": scores} if scores is not None else {}


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
        elif row["kind"] == "new" and _is_score_of(row, tasks):
            out[f"new/{row['task']}"] = row["items"]
    return out


def without_items(scores: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score rows as the records keep them (per-item scores are kept apart, in the version's settings)."""
    return [{k: v for k, v in row.items() if k != "items"} for row in scores]


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
    return {row["task"]: row["value"] for row in scores if row["kind"] == "new" and _is_score_of(row, tasks)}


def _is_score_of(row: dict[str, Any], tasks: dict[str, RegisteredTask]) -> bool:
    """A new-knowledge row is its registered task's one score: that metric, made by the registry's protocol."""
    task = tasks.get(row["task"])
    return (task is not None and row["metric"] == task.score_metric
            and (row.get("protocol") or DEFAULT_PROTOCOL) == task.protocol)


def new_average(scores: Sequence[dict[str, Any]], tasks: dict[str, RegisteredTask]) -> float | None:
    """AVnew over the registered tasks; None unless every one has a score."""
    values = new_scores(scores, tasks)
    return average(list(values.values())) if set(values) == set(tasks) and tasks else None
