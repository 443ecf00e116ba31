"""New-knowledge tasks as the study sees them: where each split lives, how to read it, its metric."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from knowstack.config import TaskConfig
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
