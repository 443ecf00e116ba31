"""The results schema: one row per model x task x metric, as CSV and as SQLite (what a study writes, and what its
report and users' scripts read).

The column names are a public interface (users' scripts read them): model, method, finetune,
stage, task, kind, metric, value, ci_low, ci_high (the value's 95% interval: a seeded percentile bootstrap over
the test items, empty where no per-item scores exist), n, trained_on, seed (the training seed, where the config
repeats models over `seeds`), then point (a sweep point's name, '' for a method's own
setting) and one column per setting a sweep can change (lr, rank, lambda, ...: filled where the model's
point sets it, and with O-LoRA's lambda), then protocol: how the value was scored (a new-knowledge
task's protocol, `builtin` or `paper`; `lm-eval` for old knowledge).

Beside results.csv a study writes per_example.jsonl (every row's per-item scores), costs.csv (what each model cost)
and study.json (StudyInfo: what the report needs of the plan). These are all the report reads.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from knowstack.atomic import atomic_write_text, honour_umask
from knowstack.config import SWEEP_COLUMNS

COLUMNS = ("model", "method", "finetune", "stage", "task", "kind", "metric", "value", "ci_low", "ci_high", "n",
           "trained_on", "seed", "point", *SWEEP_COLUMNS, "protocol")
PER_EXAMPLE = "per_example.jsonl"  # beside results.csv: every row's per-item scores
STUDY_INFO = "study.json"  # beside results.csv: what the report needs of the study's plan (StudyInfo)
OLD_PROTOCOL = "lm-eval"


@dataclass(frozen=True)
class Row:
    model: str
    method: str
    finetune: str
    stage: int | None
    task: str
    kind: str  # "new" or "old"
    metric: str
    value: float
    n: int | None
    trained_on: str
    point: str = ""
    settings: tuple[tuple[str, float], ...] = ()
    ci_low: float | None = None
    ci_high: float | None = None
    seed: int | None = None
    protocol: str = ""

    def record(self) -> dict[str, object]:
        """The row as results columns (None where empty), in COLUMNS order."""
        values: dict[str, object] = {**{c: None for c in SWEEP_COLUMNS}, **dict(self.settings)}
        return {c: values[c] if c in SWEEP_COLUMNS else getattr(self, c) for c in COLUMNS}


ItemKey = tuple[str, str, str, str]  # (model, kind, task, metric)
Items = dict[ItemKey, dict[int | None, list[float]]]


def planned_rows(evaluations: Iterable[Any]) -> list[Row]:
    """A plan's evaluations (model, method, finetune, stage, trained_on each) as value-less rows, so the report can
    say what is missing."""
    return [Row(model=e.model, method=e.method, finetune=e.finetune, stage=e.stage, task="", kind="", metric="",
                value=0.0, n=None, trained_on=e.trained_on) for e in evaluations]


@dataclass(frozen=True)
class StudyInfo:
    """What a study's report reads of its plan beside the rows (study.json): the title, the tasks in training
    order, the old-knowledge metric, the planned evaluations (value-less rows) and O-LoRA's logged penalties
    (model -> stage, lambda, first, last, steps)."""

    title: str
    task_order: list[str]
    old_metric: str = "acc"
    planned: list[Row] = field(default_factory=list)
    penalties: dict[str, dict] = field(default_factory=dict)
    # model -> its search's record (study/search.py search_record: settings, every trial, the chosen one)
    searches: dict[str, dict] = field(default_factory=dict)


def write_study_info(info: StudyInfo, path: Path) -> None:
    planned = [{k: getattr(row, k) for k in ("model", "method", "finetune", "stage", "trained_on")}
               for row in info.planned]
    atomic_write_text(path, json.dumps({"title": info.title, "task_order": info.task_order,
                                        "old_metric": info.old_metric, "planned": planned,
                                        "penalties": info.penalties,
                                        **({"searches": info.searches} if info.searches else {})},
                                       indent=1) + "\n")


def read_study_info(path: Path) -> StudyInfo | None:
    """study.json's StudyInfo; None where there is none (a study dir written before it was)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    planned = planned_rows(SimpleNamespace(**record) for record in data["planned"])
    return StudyInfo(data["title"], list(data["task_order"]), data["old_metric"], planned, data["penalties"],
                     data.get("searches", {}))


SEARCH_CSV = "search.csv"  # one row per trial of every search of a study, with its point
SEARCH_COLUMNS = ("model", "trial", "method", "lambda", "density", "weights", "eval_score", "old_held_out",
                  "old_loss_pct", "max_old_loss_pct", "within_budget", "chosen")


def search_rows(searches: dict[str, dict]) -> list[dict[str, object]]:
    """Every trial of every search as a row of search.csv (weights: the per-model weights, ';'-joined)."""
    rows = []
    for model, record in searches.items():
        for trial in record["trials"]:
            point = trial["point"]
            rows.append({"model": model, "trial": trial["number"], "method": point["method"],
                         "lambda": point.get("lambda"), "density": point.get("density"),
                         "weights": ";".join(f"{w:.4g}" for w in point.get("weights", [])),
                         "eval_score": trial["new"], "old_held_out": trial["old"], "old_loss_pct": trial["old_loss"],
                         "max_old_loss_pct": record["max_old_loss"], "within_budget": trial["within"],
                         "chosen": trial["number"] == record["chosen"]})
    return rows


def write_search_csv(searches: dict[str, dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SEARCH_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(search_rows(searches))
    atomic_write_text(path, buffer.getvalue())


def write_items(items: Items, path: Path) -> None:
    """One JSON line per results row: model, seed, kind, task, metric and its per-item scores."""
    lines = [json.dumps({"model": key[0], "seed": seed, "kind": key[1], "task": key[2], "metric": key[3],
                         "scores": scores}) + "\n"
             for key, by_seed in items.items() for seed, scores in by_seed.items()]
    atomic_write_text(path, "".join(lines))


def read_items(path: Path) -> Items:
    items: Items = {}
    if not path.is_file():
        return items
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            items.setdefault((r["model"], r["kind"], r["task"], r["metric"]), {})[r["seed"]] = r["scores"]
    return items


def write_csv(rows: list[Row], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if v is None else f"{v:g}" if c in SWEEP_COLUMNS else v
                         for c, v in row.record().items()})
    atomic_write_text(path, buffer.getvalue())


def write_sqlite(rows: list[Row], path: Path, costs: Sequence[Cost] = ()) -> None:
    """Table `results` (results.csv's columns) and table `costs` (costs.csv's: one row per model), so that one
    query can join what a model learned and forgot with what it cost."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        with sqlite3.connect(tmp) as db:
            db.execute(
                "CREATE TABLE results (model TEXT, method TEXT, finetune TEXT, stage INTEGER, task TEXT, "
                "kind TEXT, metric TEXT, value REAL, ci_low REAL, ci_high REAL, n INTEGER, trained_on TEXT, "
                "seed INTEGER, point TEXT, "
                + ", ".join(f"{c} REAL" for c in SWEEP_COLUMNS) + ", protocol TEXT)"
            )
            db.executemany(
                f"INSERT INTO results VALUES ({', '.join('?' for _ in COLUMNS)})",
                [tuple(row.record()[c] for c in COLUMNS) for row in rows],
            )
            db.execute(f"CREATE TABLE costs ({', '.join(f'{c} {COST_TYPES[c]}' for c in COST_COLUMNS)})")
            db.executemany(f"INSERT INTO costs VALUES ({', '.join('?' for _ in COST_COLUMNS)})",
                           [tuple(getattr(cost, c) for c in COST_COLUMNS) for cost in costs])
        honour_umask(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_csv(path: Path) -> list[Row]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [
            Row(
                model=r["model"], method=r["method"], finetune=r["finetune"],
                stage=int(r["stage"]) if r["stage"] else None, task=r["task"], kind=r["kind"],
                metric=r["metric"], value=float(r["value"]), n=int(r["n"]) if r["n"] else None,
                trained_on=r.get("trained_on", ""), point=r.get("point") or "",
                settings=tuple((c, float(r[c])) for c in SWEEP_COLUMNS if r.get(c)),
                ci_low=float(r["ci_low"]) if r.get("ci_low") else None,
                ci_high=float(r["ci_high"]) if r.get("ci_high") else None,
                seed=int(r["seed"]) if r.get("seed") else None,
                protocol=r.get("protocol") or "",
            )
            for r in csv.DictReader(handle)
        ]


# costs.csv, beside results.csv: one row per model (and seed), what it took to make it from the base along its
# steps (a sequential stage: its rounds and merges so far; a merge: its one-round models' training too). Cost is
# a property of a model, not of a score, so it is a file of its own rather than columns repeated on every results
# row. Empty where not measured (artifacts made before knowstack measured them) or, for GPU memory, where no GPU
# was used.
COSTS_CSV = "costs.csv"
COST_COLUMNS = ("model", "method", "finetune", "stage", "trained_on", "seed", "point", "steps", "train_seconds",
                "seconds", "examples", "peak_host_bytes", "peak_host_scope", "peak_gpu_bytes", "disk_bytes",
                "reused_steps")
COST_TYPES = {c: "TEXT" for c in ("model", "method", "finetune", "trained_on", "point", "peak_host_scope")} | {
    c: "INTEGER" for c in ("stage", "seed", "steps", "examples", "peak_host_bytes", "peak_gpu_bytes", "disk_bytes",
                           "reused_steps")} | {
    c: "REAL" for c in ("train_seconds", "seconds")}


@dataclass(frozen=True)
class Cost:
    """steps: the model-making steps behind the model (train, merge-adapter, merge, moe); train_seconds: their
    optimizer loops (train_summary.json); seconds: their wall time (each step's step.json, "cost"); examples: training
    examples drawn, summed; peak_host_bytes / peak_gpu_bytes: the largest over those steps; peak_host_scope:
    'step' or, where the peak could not be reset between steps of one process, 'process' (an upper bound);
    disk_bytes: the artifact the model is evaluated from (its adapter where it is one on the base); reused_steps: of
    those steps and its evaluation, how many the study linked from the shared step cache (their seconds are those of
    the run that computed them); None where not recorded (costs written before the cache)."""

    model: str
    method: str
    finetune: str
    stage: int | None
    trained_on: str
    seed: int | None
    point: str
    steps: int
    train_seconds: float | None
    seconds: float | None
    examples: int | None
    peak_host_bytes: int | None
    peak_host_scope: str
    peak_gpu_bytes: int | None
    disk_bytes: int | None
    reused_steps: int | None = None


def write_costs_csv(costs: list[Cost], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for cost in costs:
        writer.writerow({c: "" if (v := getattr(cost, c)) is None else v for c in COST_COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def read_costs_csv(path: Path) -> list[Cost]:
    """The costs of a study dir; [] where it has none (a study run before costs were recorded)."""
    if not path.is_file():
        return []

    def number(text: str, kind: type) -> float | int | None:
        return kind(float(text)) if kind is int and text else kind(text) if text else None

    with path.open(newline="", encoding="utf-8") as handle:
        return [Cost(model=r["model"], method=r["method"], finetune=r["finetune"], stage=number(r["stage"], int),
                     trained_on=r["trained_on"], seed=number(r["seed"], int), point=r["point"],
                     steps=int(r["steps"]), train_seconds=number(r["train_seconds"], float),
                     seconds=number(r["seconds"], float), examples=number(r["examples"], int),
                     peak_host_bytes=number(r["peak_host_bytes"], int), peak_host_scope=r["peak_host_scope"],
                     peak_gpu_bytes=number(r["peak_gpu_bytes"], int), disk_bytes=number(r["disk_bytes"], int),
                     reused_steps=number(r.get("reused_steps") or "", int))
                for r in csv.DictReader(handle)]
