"""The registry's records: one SQLite database, `registry.sqlite`, in WAL mode.

Schema (version 1). Every model the registry knows is a *version*: the base, each contribution, and
(later) each composed model, whose `parents` say what it was made from, `method` and `settings` how,
and `scores` how good it is; `status` says whether it was released or rejected.

    meta(key PK, value)                                  schema_version, created_at
    objects(sha256 PK, size)                             every object a record points to
    versions(id PK, name UNIQUE, kind, method, settings JSON, files JSON {name: sha256},
             content_hash, status, author, created_at)   kind: base | adapter | model
                                                         method: base | contribution | (later) average, ties, moe, ...
    parents(version_id, position, parent_id)             ordered: a merge's inputs in order
    contributions(version_id PK, task, task_format, metric, task_files JSON {split: {file, sha256, n}},
                  keep_data, training_config JSON {file, sha256} | NULL)
    scores(version_id, task, kind, metric, value, n, measured_at, protocol)   kind: new | old; PK (version, task,
                                                         metric); protocol: what made it (results.py's column),
                                                         added later: a registry made before has it NULL, read as
                                                         the default, and gains the column on its next write

Writes are one `BEGIN IMMEDIATE` transaction each: the write lock is taken up front, so a second
writer waits (busy timeout) instead of failing half way with SQLITE_BUSY; readers never block in WAL.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# DEFAULT_PROTOCOL: a registry's protocol where its records name none (made before registries had one).
from knowstack.config import DEFAULT_PROTOCOL
from knowstack.errors import KnowstackError
from knowstack.results import OLD_PROTOCOL

DB_FILE = "registry.sqlite"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 120.0  # contributors may queue behind each other's commits; each commit is short

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE objects (sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL);
CREATE TABLE versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('base', 'adapter', 'model')),
    method TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}',
    files TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('released', 'rejected')),
    author TEXT,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX one_base ON versions (kind) WHERE kind = 'base';
CREATE TABLE parents (
    version_id INTEGER NOT NULL REFERENCES versions (id),
    position INTEGER NOT NULL,
    parent_id INTEGER NOT NULL REFERENCES versions (id),
    PRIMARY KEY (version_id, position)
);
CREATE TABLE contributions (
    version_id INTEGER PRIMARY KEY REFERENCES versions (id),
    task TEXT NOT NULL,
    task_format TEXT NOT NULL,
    metric TEXT NOT NULL,
    task_files TEXT NOT NULL,
    keep_data INTEGER NOT NULL CHECK (keep_data IN (0, 1)),
    training_config TEXT
);
CREATE TABLE scores (
    version_id INTEGER NOT NULL REFERENCES versions (id),
    task TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('new', 'old')),
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    n INTEGER,
    measured_at TEXT NOT NULL,
    protocol TEXT,
    PRIMARY KEY (version_id, task, metric)
);
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(path: Path, *, create: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), waiting on locks rather than failing."""
    path = Path(path)
    if not create and not path.is_file():
        raise KnowstackError(f"not a registry (no {DB_FILE}): create one with `knowstack registry init`",
                             path=path.parent)
    # mode=rw: opening a registry never creates an empty database by mistake.
    uri = f"file:{path.resolve()}?mode={'rwc' if create else 'rw'}"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")  # a commit reported is a commit kept, even on power loss
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:  # some errors (e.g. a full disk) have already rolled it back
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def create_schema(conn: sqlite3.Connection, created_at: str | None = None) -> None:
    conn.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the database file
    with transaction(conn):
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                         [("schema_version", str(SCHEMA_VERSION)), ("created_at", created_at or now())])


def check_schema(conn: sqlite3.Connection, path: Path) -> None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as err:
        raise KnowstackError(f"not a registry database: {err}", path=path) from None
    if row is None or int(row["value"]) != SCHEMA_VERSION:
        found = row["value"] if row else "none"
        raise KnowstackError(f"registry schema version {found}, this knowstack reads {SCHEMA_VERSION}",
                             path=path, field="schema_version")


@dataclass
class NewVersion:
    """What one commit records: a version, its objects, parents, scores and (for a contribution) its task."""

    name: str
    kind: str
    method: str
    files: dict[str, str]
    content_hash: str
    objects: dict[str, int]  # sha256 -> size: every object the record points to
    settings: dict[str, Any] = field(default_factory=dict)
    author: str | None = None
    parents: list[str] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)  # {task, kind, metric, value, n}
    contribution: dict[str, Any] | None = None
    status: str = "released"


def name_taken(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM versions WHERE name = ?", (name,)).fetchone() is not None


def insert_version(conn: sqlite3.Connection, new: NewVersion, db_path: object, stamp: str | None = None) -> int:
    """Record `new` in one transaction: nothing of it is visible until all of it is."""
    stamp = stamp or now()
    try:
        with transaction(conn):
            conn.executemany("INSERT OR IGNORE INTO objects (sha256, size) VALUES (?, ?)", sorted(new.objects.items()))
            cursor = conn.execute(
                "INSERT INTO versions (name, kind, method, settings, files, content_hash, status, author, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (new.name, new.kind, new.method, json.dumps(new.settings, sort_keys=True),
                 json.dumps(new.files, sort_keys=True), new.content_hash, new.status, new.author, stamp))
            version_id = int(cursor.lastrowid)
            for position, parent in enumerate(new.parents):
                added = conn.execute("INSERT INTO parents (version_id, position, parent_id) "
                                     "SELECT ?, ?, id FROM versions WHERE name = ?", (version_id, position, parent))
                if added.rowcount != 1:
                    raise KnowstackError(f"parent version '{parent}' is not in this registry", path=db_path)
            _add_protocol_column(conn)
            conn.executemany(
                "INSERT INTO scores (version_id, task, kind, metric, value, n, measured_at, protocol) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(version_id, s["task"], s["kind"], s["metric"], float(s["value"]), s.get("n"), stamp,
                  s.get("protocol")) for s in new.scores])
            if new.contribution is not None:
                c = new.contribution
                conn.execute(
                    "INSERT INTO contributions (version_id, task, task_format, metric, task_files, keep_data, "
                    "training_config) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (version_id, c["task"], c["task_format"], c["metric"], json.dumps(c["task_files"], sort_keys=True),
                     int(c["keep_data"]), json.dumps(c["training_config"]) if c["training_config"] else None))
    except sqlite3.IntegrityError as err:
        if "versions.name" in str(err):
            raise KnowstackError(f"the name '{new.name}' is taken in this registry: choose another",
                                 path=db_path, field="name") from None
        raise KnowstackError(f"cannot record '{new.name}': {err}", path=db_path) from None
    return version_id


def object_shas(conn: sqlite3.Connection) -> set[str]:
    return {row["sha256"] for row in conn.execute("SELECT sha256 FROM objects")}


def versions(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every version, oldest first, with its contribution fields, parents and scores."""
    rows = conn.execute(
        "SELECT v.*, c.task, c.task_format, c.metric, c.task_files, c.keep_data, c.training_config "
        "FROM versions v LEFT JOIN contributions c ON c.version_id = v.id ORDER BY v.id").fetchall()
    names = {row["id"]: row["name"] for row in rows}
    parents: dict[int, list[str]] = {}
    for row in conn.execute("SELECT version_id, parent_id FROM parents ORDER BY version_id, position"):
        parents.setdefault(row["version_id"], []).append(names.get(row["parent_id"], "?"))
    scores: dict[int, list[dict[str, Any]]] = {}
    recorded = _has_protocol_column(conn)
    for row in conn.execute("SELECT * FROM scores ORDER BY version_id, kind, task, metric"):
        scores.setdefault(row["version_id"], []).append(
            {**{k: row[k] for k in ("task", "kind", "metric", "value", "n", "measured_at")},
             "protocol": score_protocol(row["kind"], row["protocol"] if recorded else None)})
    out = []
    for row in rows:
        record = dict(row)
        for key in ("settings", "files", "task_files", "training_config"):
            if record.get(key) is not None:
                record[key] = json.loads(record[key])
        if record.get("keep_data") is not None:
            record["keep_data"] = bool(record["keep_data"])
        record["parents"] = parents.get(row["id"], [])
        record["scores"] = scores.get(row["id"], [])
        out.append(record)
    return out


def add_scores(conn: sqlite3.Connection, name: str, scores: list[dict[str, Any]], stamp: str | None = None) -> None:
    """Scores measured later for an existing version (the base on a task contributed since init); a score
    already recorded is kept, so two composes measuring the same thing at once agree on one."""
    stamp = stamp or now()
    with transaction(conn):
        _add_protocol_column(conn)
        conn.executemany(
            "INSERT OR IGNORE INTO scores (version_id, task, kind, metric, value, n, measured_at, protocol) "
            "SELECT id, ?, ?, ?, ?, ?, ?, ? FROM versions WHERE name = ?",
            [(s["task"], s["kind"], s["metric"], float(s["value"]), s.get("n"), stamp, s.get("protocol"), name)
             for s in scores])


def score_protocol(kind: str, recorded: str | None) -> str:
    """What made a score: as recorded; for a score recorded before scores said, what made it then (the default
    protocol for new knowledge, lm-eval for old)."""
    return recorded or (OLD_PROTOCOL if kind == "old" else DEFAULT_PROTOCOL)


def _add_protocol_column(conn: sqlite3.Connection) -> None:
    """A registry made before scores named their protocol gains the column, NULL in its old rows, in the
    transaction of its first write since (reading it needs no write: `versions` reads a missing column as NULL)."""
    if not _has_protocol_column(conn):
        conn.execute("ALTER TABLE scores ADD COLUMN protocol TEXT")


def _has_protocol_column(conn: sqlite3.Connection) -> bool:
    return any(column[1] == "protocol" for column in conn.execute("PRAGMA table_info(scores)"))
