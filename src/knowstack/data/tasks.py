"""New-knowledge tasks as the study sees them: where each split lives, how to read it, its metric."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from knowstack.config import METRICS, TaskConfig
from knowstack.data.formats import Example, load_gsm8k, load_metamath, load_trace_split, trace_split_path
from knowstack.errors import KnowstackError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    format: str  # "trace" or "math"
    metric: str
    train_path: Path | None  # None: a task that is only evaluated
    test_path: Path
    eval_path: Path | None = None
    max_train: int | None = None
    max_test: int | None = None
    protocol: str | None = None  # the task's own scoring protocol, if it overrides the study's

    def load(self, split: str) -> list[Example]:
        """A split's examples, capped at max_train / max_test (the first N, in file order)."""
        path = {"train": self.train_path, "eval": self.eval_path, "test": self.test_path}[split]
        if path is None:
            raise KnowstackError(f"task '{self.name}' has no {split} split ({split}.json)"
                                 + (": it can be evaluated, not trained on" if split == "train" else ""),
                                 path=self.test_path.parent)
        examples = read_split(self.format, split, path)
        if not examples:
            raise KnowstackError(f"the {split} split of task '{self.name}' is empty", path=path)
        cap = self.max_train if split == "train" else self.max_test
        return examples[:cap] if cap else examples

    def fingerprint(self) -> str:
        """Content hash of the task's files and caps: what a trained model's cache key depends on."""
        digest = hashlib.sha256(f"{self.format}|{self.metric}|{self.max_train}|{self.max_test}".encode())
        for path in (self.train_path, self.eval_path, self.test_path):
            if path is not None:
                digest.update(_file_hash(path).encode())
        return digest.hexdigest()


def read_split(fmt: str, split: str, path: Path) -> list[Example]:
    """A split of a task in `fmt`: "trace" (every split), or "math" (MetaMathQA train, GSM8K eval/test)."""
    if fmt == "trace":
        return load_trace_split(path)
    return load_metamath(path) if split == "train" else load_gsm8k(path)


_HASH_CACHE: dict[tuple[str, float, int], str] = {}


def _file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime, stat.st_size)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def _optional_split(task_dir: Path, split: str) -> Path | None:
    try:
        return trace_split_path(task_dir, split)
    except KnowstackError:
        return None


def task_from_config(cfg: TaskConfig, *, max_test: int | None = None) -> TaskSpec:
    """Resolve a config entry to concrete files; a missing file is an error naming the task's field."""
    if cfg.path is not None:
        # A task dir without train.json is a task to evaluate on, not to train on.
        train = cfg.train_file or _optional_split(cfg.path, "train")
        test = cfg.test_file or _optional_split(cfg.path, "test")
        if test is None:
            if not Path(cfg.path).is_dir():
                raise KnowstackError("task directory not found", path=cfg.path)
            missing = "test.json" if train else "train.json or test.json"
            raise KnowstackError(f"task directory has no {missing}", path=cfg.path)
        evaluation = cfg.eval_file or _optional_split(cfg.path, "eval")
    else:
        train, test, evaluation = cfg.train_file, cfg.test_file, cfg.eval_file
    for field, path in (("train_file", train), ("test_file", test), ("eval_file", evaluation)):
        if path is not None and not Path(path).is_file():
            raise KnowstackError(f"task '{cfg.name}': file not found", path=path, field=field)
    return TaskSpec(
        name=cfg.name,
        format=cfg.format,
        metric=cfg.metric,
        train_path=Path(train) if train else None,
        test_path=Path(test),
        eval_path=Path(evaluation) if evaluation else None,
        max_train=cfg.max_train,
        max_test=cfg.max_test or max_test,
        protocol=cfg.protocol,
    )


def builtin_tasks(world_dir: Path, manifest: dict, *, max_test: int | None = None) -> list[TaskSpec]:
    """The built-in world's 7 tasks, in the paper's order, from its world.json manifest."""
    specs = []
    for entry in manifest["tasks"]:
        cfg = TaskConfig(
            name=entry["name"],
            format=entry["format"],
            path=world_dir / "tasks" / entry["dir"],
            metric=entry["metric"],
        )
        specs.append(task_from_config(cfg, max_test=max_test))
    return specs


# --- a task's metric ------------------------------------------------------------------------------------
# The metric of each task of the TRACE release, by its directory name.
TRACE_TASK_METRICS = {
    "C-STANCE": "accuracy", "FOMC": "accuracy", "MeetingBank": "rouge_l", "Py150": "edit_similarity",
    "ScienceQA": "accuracy", "NumGLUE-cm": "exact_match", "NumGLUE-ds": "exact_match", "20Minuten": "sari",
}
# A user's task dir may say its metric in this file, beside its splits: {"metric": "rouge_l"}. Not `task.json`:
# other suites (BIG-bench) ship files of that name with their own fields.
TASK_METADATA = "knowstack-task.json"
TASK_METADATA_FIELDS = ("metric",)
# The built-in world's manifest (builtin/world.py writes it): WORLD/world.json lists each of WORLD/tasks/<dir>.
WORLD_MANIFEST = "world.json"


@dataclass(frozen=True)
class ResolvedMetric:
    """A task's metric and, in words, what defined it (shown and recorded beside its scores)."""

    metric: str
    source: str


def task_metric(task: str | Path, *, given: str | None = None, task_format: str = "trace",
                option: str = "--metric") -> ResolvedMetric:
    """The metric of a task dir (or of the dir holding a split file), from the first that defines it: `given`
    (the --metric option or the API's metric argument, named `option`), the dir's knowstack-task.json, the built-in
    world's world.json (for WORLD/tasks/<dir>), the math format, TRACE's task names. Nothing defining it is an
    error that says how to give it. The one resolver behind eval, score, contribute and the API."""
    if given is not None:
        if given not in METRICS:
            raise KnowstackError(f"unknown metric '{given}' (known: {', '.join(METRICS)})", field=option)
        return ResolvedMetric(given, option)
    where = Path(task).expanduser()
    folder = where if where.is_dir() or not where.suffix else where.parent
    for found in (_metadata_metric(folder), _world_metric(folder)):
        if found is not None:
            return found
    if task_format == "math":
        return ResolvedMetric("math", "the math format")
    if folder.name in TRACE_TASK_METRICS:
        return ResolvedMetric(TRACE_TASK_METRICS[folder.name], f"TRACE's task name '{folder.name}'")
    if where == folder:
        trace_split_path(folder, "test")  # a dir that is not there, or has no test split, says so first
    raise KnowstackError(
        f"nothing defines the metric of task '{folder.name}': give {option} NAME or write "
        f'{folder / TASK_METADATA} as {{"metric": "NAME"}}, NAME one of {", ".join(METRICS)} (a task\'s metric is '
        f"read from that file, from the built-in world's {WORLD_MANIFEST}, or from TRACE's task names: "
        f"{', '.join(TRACE_TASK_METRICS)})",
        path=where)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KnowstackError(f"not readable as JSON ({err})", path=path) from None


def _metadata_metric(folder: Path) -> ResolvedMetric | None:
    """The metric a user's knowstack-task.json declares, checked; None where there is no such file."""
    path = folder / TASK_METADATA
    if not path.is_file():
        return None
    record = _read_json(path)
    if not isinstance(record, dict):
        raise KnowstackError('expected a JSON object such as {"metric": "rouge_l"}', path=path)
    for name in record:
        if name not in TASK_METADATA_FIELDS:
            raise KnowstackError(f"unknown field (known: {', '.join(TASK_METADATA_FIELDS)})", path=path, field=name)
    metric = record.get("metric")
    if metric not in METRICS:
        said = "missing" if metric is None else f"unknown metric {json.dumps(metric)}"
        raise KnowstackError(f"{said} (known: {', '.join(METRICS)})", path=path, field="metric")
    return ResolvedMetric(metric, str(path))


def _world_metric(folder: Path) -> ResolvedMetric | None:
    """The metric the built-in world's manifest gives WORLD/tasks/<dir>; None outside a built world."""
    manifest = folder.parent.parent / WORLD_MANIFEST
    if folder.parent.name != "tasks" or not manifest.is_file():
        return None
    record = _read_json(manifest)
    entries = record.get("tasks", []) if isinstance(record, dict) else []
    for entry in entries:
        if isinstance(entry, dict) and entry.get("dir") == folder.name and entry.get("metric") in METRICS:
            return ResolvedMetric(entry["metric"], f"the built-in world's {manifest}")
    return None
