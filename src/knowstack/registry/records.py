"""Where a registry's records live: SQLite in a local directory, or an append-only log on any file system
fsspec reaches.

Both answer the same questions from the same SQLite schema (db.py); they differ in how a write becomes
visible to the other contributors.

- `SqliteRecords` (a local path): `registry.sqlite` in WAL mode; a write is one transaction.
- `LogRecords` (a URL such as `s3://bucket/reg`): SQLite cannot live on an object store (no POSIX locks,
  no in-place writes), so each write is one immutable JSON entry, `log/00000001.json`, `log/00000002.json`,
  ..., created with exclusive creation (fsspec's `mode="xb"`: S3's If-None-Match, GCS's generation match,
  Azure's overwrite=False, O_EXCL locally). Readers replay the entries in order into an in-memory SQLite
  database. A writer replays everything first, applies its entry there (which checks it exactly as a
  local registry would: name free, parents present), then claims the next number; if another writer
  claimed that number first, it replays again and retries. Entries are never rewritten, so every
  reader sees the same history, and two writers can never both take a name.
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import time
from dataclasses import asdict
from typing import Any

from knowstack.errors import KnowstackError
from knowstack.registry import db

LOG_DIR = "log"
_ENTRY_DIGITS = 8
_CLAIM_ATTEMPTS = 200
_PARTIAL_WAIT_S = 10.0  # a local writer's entry is briefly visible before its bytes are all written


class SqliteRecords:
    """The records of a registry in a local directory: one SQLite database shared by every process."""

    def __init__(self, conn: sqlite3.Connection, where: object):
        self.conn, self.where = conn, where

    def versions(self) -> list[dict[str, Any]]:
        return db.versions(self.conn)

    def name_taken(self, name: str) -> bool:
        return db.name_taken(self.conn, name)

    def object_shas(self) -> set[str]:
        return db.object_shas(self.conn)

    def insert(self, new: db.NewVersion) -> None:
        db.insert_version(self.conn, new, self.where)

    def add_scores(self, name: str, scores: list[dict[str, Any]]) -> None:
        db.add_scores(self.conn, name, scores)

    def close(self) -> None:
        self.conn.close()


def entry_name(seq: int) -> str:
    return f"{seq:0{_ENTRY_DIGITS}d}.json"


def create_log(fs: Any, root: str, label: str, base: db.NewVersion) -> bool:
    """Write the first log entry (schema version and the base's record); False if a registry was there first."""
    entry = {"op": "init", "at": db.now(), "schema_version": db.SCHEMA_VERSION, "version": asdict(base)}
    apply_entry(_memory_db(), entry, label)  # the check every reader makes
    return create_exclusive(fs, f"{root.rstrip('/')}/{LOG_DIR}/{entry_name(1)}",
                            json.dumps(entry, sort_keys=True).encode("utf-8"))


def apply_entry(conn: sqlite3.Connection, entry: dict[str, Any], where: str) -> None:
    """Replay one log entry into `conn`; a malformed one is an error naming it."""
    try:
        op, stamp = entry["op"], entry["at"]
        if op == "init":
            if int(entry["schema_version"]) != db.SCHEMA_VERSION:
                raise KnowstackError(f"registry schema version {entry['schema_version']}, this knowstack reads "
                                     f"{db.SCHEMA_VERSION}", path=where, field="schema_version")
            db.create_schema(conn, created_at=stamp)
            db.insert_version(conn, db.NewVersion(**entry["version"]), where, stamp)
        elif op == "version":
            db.insert_version(conn, db.NewVersion(**entry["version"]), where, stamp)
        elif op == "scores":
            db.add_scores(conn, entry["name"], entry["scores"], stamp)
        else:
            raise KnowstackError(f"unknown log entry op {op!r}", path=where, field="op")
    except (KeyError, TypeError, ValueError, sqlite3.DatabaseError) as err:
        raise KnowstackError(f"malformed registry log entry: {err!r}", path=where) from None


class LogRecords(SqliteRecords):
    """The records of a registry on an fsspec file system: an append-only log replayed into memory."""

    def __init__(self, fs: Any, root: str, label: str):
        self.fs, self.log_dir, self.label = fs, f"{root.rstrip('/')}/{LOG_DIR}", label.rstrip("/")
        super().__init__(_memory_db(), f"{self.label}/{LOG_DIR}")
        self.applied = 0
        self.refresh()
        if self.applied == 0:
            raise KnowstackError("not a registry (no log entries): create one with `knowstack registry init`",
                                 path=self.label)

    def entry_path(self, seq: int) -> str:
        return f"{self.log_dir}/{entry_name(seq)}"

    def refresh(self) -> None:
        """Replay the entries written since the last refresh."""
        self.fs.invalidate_cache(self.log_dir)  # s3fs and others cache listings; a stale one misses entries
        names = sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.log_dir, detail=False)) \
            if self.fs.exists(self.log_dir) else []
        entries = [n for n in names if n.endswith(".json") and n[:-5].isdigit()]
        for expected, name in enumerate(entries, start=1):
            if name != entry_name(expected):
                raise KnowstackError(f"registry log has a gap: {entry_name(expected)} is missing",
                                     path=self.where)
        new = range(self.applied + 1, len(entries) + 1)
        # One call for all new entries: async stores (s3fs, gcsfs) fetch them concurrently, not one round trip each.
        fetched = self.fs.cat([self.entry_path(seq) for seq in new]) if len(new) > 1 else {}
        for seq in new:
            entry = _parsed(fetched.get(self.entry_path(seq)))
            if entry is None:  # absent from the bulk read, or a local writer's entry still being written
                entry = self._read_entry(seq)
            apply_entry(self.conn, entry, f"{self.label}/{LOG_DIR}/{entry_name(seq)}")
            self.applied = seq

    def _read_entry(self, seq: int) -> dict[str, Any]:
        deadline = time.monotonic() + _PARTIAL_WAIT_S
        while True:
            entry = _parsed(self.fs.cat_file(self.entry_path(seq)))
            if entry is not None:
                return entry
            if time.monotonic() > deadline:
                raise KnowstackError("registry log entry is not valid JSON (a writer died while writing it, "
                                     "or it was edited)", path=f"{self.label}/{LOG_DIR}/{entry_name(seq)}")
            time.sleep(0.05)

    def _trial_copy(self) -> sqlite3.Connection:
        """A copy of the replayed state to try an entry on: a claim that fails leaves the replay untouched."""
        trial = _memory_db()
        self.conn.backup(trial)
        return trial

    def versions(self) -> list[dict[str, Any]]:
        self.refresh()
        return super().versions()

    def name_taken(self, name: str) -> bool:
        self.refresh()
        return super().name_taken(name)

    def object_shas(self) -> set[str]:
        self.refresh()
        return super().object_shas()

    def insert(self, new: db.NewVersion) -> None:
        self.append({"op": "version", "version": asdict(new)})

    def add_scores(self, name: str, scores: list[dict[str, Any]]) -> None:
        self.append({"op": "scores", "name": name, "scores": scores})

    def append(self, entry: dict[str, Any]) -> None:
        """Check `entry` against everything recorded so far, then claim the next log number for it."""
        for _ in range(_CLAIM_ATTEMPTS):
            self.refresh()
            claimed, seq, trial = {**entry, "at": db.now()}, self.applied + 1, self._trial_copy()
            try:
                apply_entry(trial, claimed, self.label)  # raises (e.g. name taken) before anything is written
                won = create_exclusive(self.fs, self.entry_path(seq), json.dumps(claimed, sort_keys=True).encode())
            except BaseException:
                trial.close()
                raise
            if won:
                self.conn.close()
                self.conn, self.applied = trial, seq
                return
            trial.close()  # another writer took `seq`: replay it and check again
            time.sleep(random.uniform(0.01, 0.1))
        raise KnowstackError(f"could not record after {_CLAIM_ATTEMPTS} attempts: too many writers at once",
                             path=self.where)


def _memory_db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def _parsed(blob: bytes | None) -> dict[str, Any] | None:
    """A log entry's JSON object, or None while it is absent or not all written yet."""
    try:
        entry = json.loads(blob.decode("utf-8")) if blob is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return entry if isinstance(entry, dict) else None


def create_exclusive(fs: Any, path: str, payload: bytes) -> bool:
    """Write `payload` to `path` only if nothing is there; False if something was."""
    try:
        with fs.open(path, "xb") as handle:
            handle.write(payload)
    except FileExistsError:
        return False
    return True


def check_exclusive_create(fs: Any, directory: str, label: str) -> None:
    """Refuse a file system that silently overwrites under `mode="xb"`: the log would lose entries on it."""
    probe = f"{directory.rstrip('/')}/.exclusive-probe-{random.getrandbits(64):016x}"
    try:
        if not create_exclusive(fs, probe, b"1") or create_exclusive(fs, probe, b"2"):
            raise KnowstackError("this file system does not refuse a second exclusive creation (fsspec mode "
                                 "'xb'), which a shared registry needs so that two contributors never both take "
                                 "a name; use a local or mounted directory, or a store with conditional writes "
                                 "(s3fs, gcsfs, adlfs)", path=label)
    except ValueError as err:  # some implementations reject the mode outright
        raise KnowstackError(f"this file system cannot create files exclusively ({err})", path=label) from None
    finally:
        with contextlib.suppress(OSError):
            fs.rm_file(probe)
