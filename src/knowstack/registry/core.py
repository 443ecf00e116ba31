"""A registry: records (what each version is, its parents, its scores) beside `objects/` (the bytes they point to).

At a local path the records are `registry.sqlite`; at a URL fsspec reaches (`s3://bucket/team-reg`, `gs://...`,
`file:///mnt/shared/reg`) they are an append-only log (records.py) and objects are read through a local cache.
Everything above this module is the same for both.

    reg = Registry.open(path_or_url)
    reg.versions()            # every version, oldest first, with scores
    with reg.view("base") as model_dir: ...   # a loadable dir of verified objects
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knowstack.errors import KnowstackError
from knowstack.registry import db
from knowstack.registry.records import LogRecords, SqliteRecords
from knowstack.registry.store import ObjectStore, RemoteObjectStore, StoredFile

BASE_NAME = "base"
# A name becomes part of messages, file names of exports and CLI arguments: keep it plain.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise KnowstackError(f"invalid name {name!r}: use 1-64 letters, digits, '_', '.', '-', starting with a "
                             "letter or digit (no path separators, no '..')", field="name")
    return name


def is_url(root: str | Path) -> bool:
    """A registry root with a protocol (`s3://`, `file://`, ...) is opened through fsspec; a plain path is local."""
    return isinstance(root, str) and "://" in root


def cache_dir(url: str) -> Path:
    """Where a remote registry's objects are cached and its composes build: `$KNOWSTACK_CACHE` (default
    ~/.cache/knowstack)/registries/<hash of the URL>. Deleting it loses nothing but downloads."""
    base = Path(os.environ.get("KNOWSTACK_CACHE") or "~/.cache/knowstack").expanduser()
    return base / "registries" / hashlib.sha256(url.rstrip("/").encode("utf-8")).hexdigest()[:16]


def remote_fs(url: str) -> tuple[Any, str]:
    """The fsspec file system and path for `url`; a missing backend (e.g. s3fs) is one clear error."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise KnowstackError(f"cannot open this registry URL: {err}", path=url) from None


@dataclass
class Registry:
    label: str  # the path or URL, as messages name it
    records: SqliteRecords
    store: ObjectStore
    work_dir: Path  # local scratch: compose keeps its build and scores here until the version is recorded

    @classmethod
    def open(cls, root: str | Path) -> Registry:
        if is_url(root):
            url = str(root).rstrip("/")
            fs, path = remote_fs(url)
            cache = cache_dir(url)
            return cls(url, LogRecords(fs, path, url), RemoteObjectStore(fs, path, cache, url), cache)
        root = Path(root).expanduser()
        path = root / db.DB_FILE
        conn = db.connect(path)
        db.check_schema(conn, path)
        return cls(str(root), SqliteRecords(conn, path), ObjectStore(root), root)

    @property
    def name(self) -> str:
        """The registry's last path part, for titles."""
        return self.label.rstrip("/").rsplit("/", 1)[-1]

    @property
    def where(self) -> object:
        """What an error about the records names: the database file, or the log."""
        return self.records.where

    def close(self) -> None:
        self.records.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def name_taken(self, name: str) -> bool:
        return self.records.name_taken(name)

    def record(self, new: db.NewVersion) -> None:
        """Commit `new` (its objects already stored): all of it becomes visible at once, or nothing does."""
        self.records.insert(new)

    def add_scores(self, name: str, scores: list[dict[str, Any]]) -> None:
        self.records.add_scores(name, scores)

    def versions(self) -> list[dict[str, Any]]:
        return self.records.versions()

    def version(self, name: str) -> dict[str, Any]:
        for record in self.versions():
            if record["name"] == name:
                return record
        raise KnowstackError(f"no version named '{name}' in this registry", path=self.label, field="name")

    def base(self) -> dict[str, Any]:
        for record in self.versions():
            if record["kind"] == "base":
                return record
        raise KnowstackError("registry has no base model record", path=self.where)

    @property
    def protocol(self) -> str:
        """How this registry scores (registry init --protocol)."""
        return registry_protocol(self.versions())

    @property
    def harness(self) -> dict[str, Any]:
        """lm-eval's settings this registry scores with (registry init --num-fewshot, --add-bos-token): those given."""
        return dict(self.base()["settings"].get(HARNESS) or {})

    @contextlib.contextmanager
    def view(self, name: str) -> Iterator[Path]:
        """A temporary dir of version `name`'s files, each verified against its hash first."""
        with self.store.view(self.version(name)["files"]) as path:
            yield path

    def read_json(self, sha: str) -> Any:
        return json.loads(self.store.read_bytes(sha).decode("utf-8"))

    def verify(self, names: list[str] | None = None) -> int:
        """Re-hash every object the named versions (default: all) point to, where it is stored (and, for a remote
        registry, in the local cache too); returns how many were checked."""
        records = [r for r in self.versions() if names is None or r["name"] in names]
        missing = set(names or ()) - {r["name"] for r in records}
        if missing:
            raise KnowstackError(f"no version named '{sorted(missing)[0]}' in this registry", path=self.label)
        shas = {sha for record in records for sha in _record_objects(record)}
        for sha in sorted(shas):
            self.store.check(sha)
        return len(shas)

    def collect_garbage(self, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> list[StoredFile]:
        """Delete object files no record points to (left by contributions or composes that failed before their
        commit), and leftover temporary files, once older than `grace_seconds`: a contributor storing objects
        right now has not committed its record yet, and its files must survive. Returns what was (or would be)
        removed."""
        referenced = self.records.object_shas()
        referenced |= {sha for record in self.versions() for sha in _record_objects(record)}
        cutoff = time.time() - grace_seconds
        removed = [stored for stored in self.store.stored_files()
                   if stored.name not in referenced and stored.modified <= cutoff]
        if not dry_run:
            for stored in removed:
                self.store.remove(stored)
        return removed


PROTOCOL = "protocol"  # the base's settings key: how the registry scores (evaluation.protocol), set at init
# the base's settings key of lm-eval's settings given at init ({"num_fewshot": n, "add_bos_token": b}, those given):
# old knowledge's as a study's old_knowledge section's, add_bos_token also its evaluation's (GSM8K under paper)
HARNESS = "harness"


def registry_protocol(records: Sequence[dict[str, Any]]) -> str:
    """How the registry's versions are scored: the protocol its base recorded at init (a registry made before
    registries had one: the default)."""
    base = next((r for r in records if r["kind"] == "base"), None)
    return (base["settings"].get(PROTOCOL) if base else None) or db.DEFAULT_PROTOCOL


def composed(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The versions compose made (neither the base nor a contribution), oldest first."""
    return [r for r in records if r["method"] not in ("base", "contribution")]


def ancestor_contributions(records: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The contributions a version was built from, directly or through the versions it was built on, in order."""
    by_name = {r["name"]: r for r in records}
    found: dict[str, dict[str, Any]] = {}

    def visit(current: str) -> None:
        record = by_name[current]
        if record["method"] == "contribution":
            found.setdefault(current, record)
            return
        for parent in record["parents"]:
            visit(parent)

    visit(name)
    return list(found.values())


STATISTICS = "statistics"  # a contribution's settings key: its statistics dir's files, {name: sha256}


def _record_objects(record: Mapping[str, Any]) -> Iterator[str]:
    yield from record["files"].values()
    for entry in (record.get("task_files") or {}).values():
        yield entry["sha256"]
    if record.get("training_config"):
        yield record["training_config"]["sha256"]
    yield from (record["settings"].get("old_knowledge") or {}).get("files", {}).values()
    yield from (record["settings"].get(STATISTICS) or {}).values()
