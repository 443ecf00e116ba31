"""A registry on disk: `registry.sqlite` (the records) beside `objects/` (the bytes they point to).

    reg = Registry.open(path)
    reg.versions()            # every version, oldest first, with scores
    with reg.view("base") as model_dir: ...   # a loadable dir of verified objects
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knowstack.errors import KnowstackError
from knowstack.registry import db
from knowstack.registry.store import ObjectStore

BASE_NAME = "base"
# A name becomes part of messages, file names of exports and CLI arguments: keep it plain.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise KnowstackError(f"invalid name {name!r}: use 1-64 letters, digits, '_', '.', '-', starting with a "
                             "letter or digit (no path separators, no '..')", field="name")
    return name


@dataclass
class Registry:
    root: Path
    conn: sqlite3.Connection
    store: ObjectStore

    @classmethod
    def open(cls, root: str | Path) -> Registry:
        root = Path(root).expanduser()
        path = root / db.DB_FILE
        conn = db.connect(path)
        db.check_schema(conn, path)
        return cls(root, conn, ObjectStore(root))

    @property
    def db_path(self) -> Path:
        return self.root / db.DB_FILE

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def versions(self) -> list[dict[str, Any]]:
        return db.versions(self.conn)

    def version(self, name: str) -> dict[str, Any]:
        for record in self.versions():
            if record["name"] == name:
                return record
        raise KnowstackError(f"no version named '{name}' in this registry", path=self.root, field="name")

    def base(self) -> dict[str, Any]:
        for record in self.versions():
            if record["kind"] == "base":
                return record
        raise KnowstackError("registry has no base model record", path=self.db_path)

    @contextlib.contextmanager
    def view(self, name: str) -> Iterator[Path]:
        """A temporary dir of version `name`'s files, each verified against its hash first."""
        with self.store.view(self.version(name)["files"]) as path:
            yield path

    def read_json(self, sha: str) -> Any:
        return json.loads(self.store.read_bytes(sha).decode("utf-8"))

    def verify(self, names: list[str] | None = None) -> int:
        """Re-hash every object the named versions (default: all) point to; returns how many were checked."""
        records = [r for r in self.versions() if names is None or r["name"] in names]
        missing = set(names or ()) - {r["name"] for r in records}
        if missing:
            raise KnowstackError(f"no version named '{sorted(missing)[0]}' in this registry", path=self.root)
        shas = {sha for record in records for sha in _record_objects(record)}
        for sha in sorted(shas):
            self.store.verified_path(sha)
        return len(shas)


    def collect_garbage(self, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> list[Path]:
        """Delete object files no record points to (left by contributions or composes that failed before their
        commit), and leftover temporary files, once older than `grace_seconds`: a contributor storing objects
        right now has not committed its record yet, and its files must survive. Returns what was (or would be)
        removed."""
        referenced = {row["sha256"] for row in self.conn.execute("SELECT sha256 FROM objects")}
        referenced |= {sha for record in self.versions() for sha in _record_objects(record)}
        cutoff = time.time() - grace_seconds
        removed = []
        for path in sorted(self.store.root.glob("*/*")):
            if path.name in referenced or not path.is_file() or path.stat().st_mtime > cutoff:
                continue
            removed.append(path)
            if not dry_run:
                path.unlink()
        return removed


def composed(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The versions compose made (neither the base nor a contribution), oldest first."""
    return [r for r in records if r["method"] not in ("base", "contribution")]


def _record_objects(record: Mapping[str, Any]) -> Iterator[str]:
    yield from record["files"].values()
    for entry in (record.get("task_files") or {}).values():
        yield entry["sha256"]
    if record.get("training_config"):
        yield record["training_config"]["sha256"]
    yield from (record["settings"].get("old_knowledge") or {}).get("files", {}).values()
