"""`knowstack registry init`: a new registry holding its base model, and the base's old-knowledge scores.

The base's files (config, safetensors weights, tokenizer) are stored as objects like every other model,
so contributions are checked and scored against exactly the base the registry recorded, and a later
compose needs nothing outside the registry. A local registry is built in a temporary dir beside its final
path and renamed into place; a remote one (a URL) is built in a local temporary dir, its objects are
uploaded, and it exists from the moment its first log entry is created. Either way an interrupted init
leaves nothing that looks like a registry.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knowstack.atomic import honour_umask
from knowstack.combine.inputs import FullModel
from knowstack.config import EVAL_BATCH_SIZE
from knowstack.errors import KnowstackError
from knowstack.hashing import content_hash, file_sha256
from knowstack.modeling.streaming import INDEX_FILE, weight_files
from knowstack.modelio import TOKENIZER_FILES
from knowstack.registry import db
from knowstack.registry.core import BASE_NAME, HARNESS, PROTOCOL, Registry, cache_dir, is_url, remote_fs
from knowstack.registry.db import DEFAULT_PROTOCOL
from knowstack.registry.records import LOG_DIR, check_exclusive_create, create_log
from knowstack.registry.store import OBJECTS_DIR, ObjectStore, RemoteObjectStore

# The config fields that decide whether two checkpoints are the same network (and what a reader wants to see).
ARCHITECTURE_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                       "max_position_embeddings", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
                       "tie_word_embeddings", "num_local_experts", "num_experts_per_tok")


def model_files(model: FullModel, *, with_tokenizer: bool) -> tuple[dict[str, Path], list[str]]:
    """The files that make `model` loadable ({name: path}) and the names its content hash covers
    (config.json and the safetensors weights: what decides the network, not how it is tokenized)."""
    weights = weight_files(model.path)  # refuses a dir with only pickled weights, naming them
    hashed = ["config.json", *(file.name for file in weights)]
    extras = [INDEX_FILE, "generation_config.json", *(TOKENIZER_FILES if with_tokenizer else ())]
    files = {name: model.path / name for name in hashed}
    files.update({name: model.path / name for name in extras if (model.path / name).is_file()})
    return files, hashed


def weights_hash(model: FullModel) -> str:
    """The content hash a registry records for a model dir, computed from the dir itself."""
    _, hashed = model_files(model, with_tokenizer=False)
    return content_hash({name: file_sha256(model.path / name) for name in hashed})


def store_files(store: ObjectStore, files: dict[str, Path]) -> tuple[dict[str, str], dict[str, int]]:
    """Store every file; returns ({name: sha256}, {sha256: size})."""
    names, sizes = {}, {}
    for name, path in sorted(files.items()):
        sha, size = store.put_file(path)
        names[name], sizes[sha] = sha, size
    return names, sizes


def architecture(model: FullModel) -> dict[str, Any]:
    arch = {key: model.config[key] for key in ARCHITECTURE_FIELDS if key in model.config}
    arch["parameters"] = sum(math.prod(spec.shape) for spec in model.specs.values())
    arch["tensors"] = len(model.specs)
    return arch



def _check_free(root: Path) -> None:
    if (root / db.DB_FILE).exists():
        raise KnowstackError("a registry already exists here: init refuses to touch it", path=root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise KnowstackError("exists and is not an empty directory: a registry needs a new or empty dir", path=root)


def init_registry(
    root: str | Path,
    base: str | Path,
    *,
    old_tasks: Sequence[str] = (),
    include_path: str | Path | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    limit: int | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    num_fewshot: int | None = None,
    add_bos_token: bool | None = None,
) -> dict[str, Any]:
    """Create the registry `root` (a path, or a URL fsspec reaches) for the base model dir `base`; returns the
    base's record. protocol: how every score the registry records is made (evaluation.protocol: builtin, paper),
    recorded with the base; num_fewshot, add_bos_token: lm-eval's, as a study's old_knowledge (add_bos_token also as
    its evaluation's, for what the harness scores of new tasks), recorded with the base (registry/core.py
    HARNESS) and used by every score."""
    from knowstack.evaluate.protocols import PROTOCOL_NAMES

    if protocol not in PROTOCOL_NAMES:
        raise KnowstackError(f"unknown protocol '{protocol}' (known: {', '.join(PROTOCOL_NAMES)})", field="protocol")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise KnowstackError(f"num_fewshot is a whole number of at least 0, not {num_fewshot!r}", field="num_fewshot")
    model = FullModel(Path(base).expanduser())
    harness = {name: value for name, value in (("num_fewshot", num_fewshot), ("add_bos_token", add_bos_token))
               if value is not None}
    old = OldTasks(list(old_tasks), include_path, batch_size, limit, protocol, harness)
    if is_url(root):
        return _init_remote(str(root).rstrip("/"), model, old)
    root = Path(root).expanduser()
    _check_free(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.init-", dir=root.parent))
    try:
        store = ObjectStore(tmp)
        new = _base_version(store, model, old)
        _write_database(tmp / db.DB_FILE, new)
        honour_umask(tmp)  # mkdtemp makes it private; a registry is shared like any new dir
        try:
            # rename() onto an existing non-empty dir fails: of two racing inits exactly one wins.
            os.rename(tmp, root)
        except OSError:
            raise KnowstackError("a registry already exists here: init refuses to touch it", path=root) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    with Registry.open(root) as reg:
        return reg.base()


def _init_remote(url: str, model: FullModel, old: OldTasks) -> dict[str, Any]:
    fs, path = remote_fs(url)
    _check_free_remote(fs, path, url)
    fs.makedirs(f"{path}/{LOG_DIR}", exist_ok=True)
    check_exclusive_create(fs, f"{path}/{LOG_DIR}", url)
    with tempfile.TemporaryDirectory(prefix="knowstack-init-") as tmp:
        # Everything that can fail (hashing, the old-knowledge evaluation) happens before the first upload.
        local = ObjectStore(Path(tmp))
        new = _base_version(local, model, old)
        remote = RemoteObjectStore(fs, path, cache_dir(url), url)
        for sha in sorted(new.objects):
            remote.put_file(local.path(sha))
    if not create_log(fs, path, url, new):
        raise KnowstackError("a registry already exists here: init refuses to touch it", path=url)
    with Registry.open(url) as reg:
        return reg.base()


def _check_free_remote(fs: Any, path: str, url: str) -> None:
    """A new registry goes where nothing is, or where an interrupted init left only objects and an empty log."""
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise KnowstackError("exists and is not a directory: a registry needs a new or empty location", path=url)
    names = {_last_part(entry) for entry in fs.ls(path, detail=False)}
    if LOG_DIR in names and any(not _last_part(e).startswith(".") for e in fs.ls(f"{path}/{LOG_DIR}", detail=False)):
        raise KnowstackError("a registry already exists here: init refuses to touch it", path=url)
    foreign = sorted(names - {LOG_DIR, OBJECTS_DIR})
    if foreign:
        raise KnowstackError(f"holds files that are not a registry's ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}): a registry needs a new or empty location",
                             path=url)


def _last_part(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _write_database(path: Path, new: db.NewVersion) -> None:
    conn = db.connect(path, create=True)
    try:
        db.create_schema(conn)
        db.insert_version(conn, new, path)
    finally:
        conn.close()


@dataclass(frozen=True)
class OldTasks:
    """What init scores the base on (the lm-eval tasks, their include dir, example limit, batch) and the registry's
    protocol."""

    tasks: list[str]
    include_path: str | Path | None
    batch_size: int
    limit: int | None
    protocol: str
    harness: dict[str, Any] = field(default_factory=dict)  # lm-eval's settings given (num_fewshot, add_bos_token)


def _base_version(store: ObjectStore, model: FullModel, old: OldTasks) -> db.NewVersion:
    """The base's record, its files stored in `store` and its old knowledge measured."""
    files, hashed = model_files(model, with_tokenizer=True)
    names, sizes = store_files(store, files)
    settings: dict[str, Any] = {"source": str(model.path.resolve()), "architecture": architecture(model),
                                PROTOCOL: old.protocol}
    if old.harness:  # only where given: a registry's records, as before, where not
        settings[HARNESS] = old.harness
    scores: list[dict[str, Any]] = []
    if old.tasks:
        include = Path(old.include_path).expanduser() if old.include_path else None
        if include is not None and not include.is_dir():
            raise KnowstackError("lm-eval include path not found", path=include, field="include_path")
        settings["old_knowledge"] = {"tasks": old.tasks, "include_path": str(include) if include else None,
                                     "limit": old.limit, "files": {}}
        if include is not None:
            # The task YAMLs and their data travel with the registry, for re-measuring composed models later.
            task_files = {str(p.relative_to(include)): p for p in sorted(include.rglob("*")) if p.is_file()}
            settings["old_knowledge"]["files"], task_sizes = store_files(store, task_files)
            sizes.update(task_sizes)
        with store.view(names) as model_dir:
            scores = old_knowledge_scores(model_dir, old, include)
        # Kept for the gate's paired intervals; the score rows keep the means.
        from knowstack.registry.evaluate import item_scores, without_items

        settings["item_scores"], scores = item_scores(scores, {}), without_items(scores)
    return db.NewVersion(name=BASE_NAME, kind="base", method="base", files=names,
                         content_hash=content_hash({name: names[name] for name in hashed}), objects=sizes,
                         settings=settings, scores=scores)


def old_knowledge_scores(model_dir: Path, old: OldTasks, include_path: Path | None) -> list[dict[str, Any]]:
    """The base's old-knowledge score rows, by the study's evaluation step (registry/evaluate.py)."""
    from knowstack.config import OldKnowledgeConfig
    from knowstack.registry.evaluate import score_model

    section = OldKnowledgeConfig(tasks=old.tasks, include_path=include_path, limit=old.limit,
                                 batch_size=old.batch_size, **old.harness)
    with tempfile.TemporaryDirectory(prefix="knowstack-score-") as work:
        return score_model(Path(work), model_dir, model_dir, None, [], section, protocol=old.protocol,
                           batch_size=old.batch_size, harness=old.harness)
