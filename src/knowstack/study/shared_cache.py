"""The shared step cache: a finished step's outputs stored by its key once per machine (KNOWSTACK_CACHE, by default
~/.cache/knowstack/steps), linked into every study dir whose plan has that key, so the built-in world, the base's
evaluations and any step two studies share are computed once.

An entry is `ROOT/<key>/`: the step's artifact files, hard links to the study dir's files that made it (a copy where
the cache is on another file system), and `.entry.json`, the list of those files and their sizes, written last. An
entry is published by renaming a complete temporary dir, so a half-written one is never seen; one whose files do not
match its list (cut short, edited, partly removed) is ignored, removed and computed again. A step is computed or
linked under a lock of its key (`ROOT/.locks/<key>.lock`): two studies that need it at once compute it once, the
second linking what the first published.

Only steps made from nothing but their key are shared (`shareable_keys`): the built-in world and what is made from
it and from the study's task files (fingerprinted in the keys). A step that reads a model or tokenizer by a path or
hub id, or old-knowledge tasks of lm-eval's own (data the key names but does not fingerprint), stays in its study
dir: the same name may hold other weights or data on another day.

Artifact files are written by rename, never edited in place, so a link shares nothing that changes; a study dir
records each step it linked in `artifacts/.reused/<key>.json` (the costs, and the summary, say which steps were
reused); the step's own record (step.json) keeps the cost of the run that computed it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knowstack.atomic import atomic_dir, atomic_write_json, honour_umask, link_or_copy
from knowstack.study.graph import Plan, Step

CACHE_ENV = "KNOWSTACK_CACHE"
ENTRY_FILE = ".entry.json"  # an entry's list of files and sizes, written last
LOCKS_DIR = ".locks"
REUSED_DIR = ".reused"  # under a study's artifacts: one record per step linked from the cache


def default_root() -> Path:
    """$KNOWSTACK_CACHE, else $XDG_CACHE_HOME/knowstack/steps, else ~/.cache/knowstack/steps."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: relative paths are invalid
    return base / "knowstack" / "steps"


@dataclass(frozen=True)
class SharedCache:
    """The cache a study uses: its root and the keys of the study's steps that may be shared."""

    root: Path
    keys: frozenset[str]

    def entry(self, key: str) -> Path:
        return self.root / key


def open_cache(plan: Plan, root: Path | None = None) -> tuple[SharedCache | None, str]:
    """The study's cache, or None and why: a cache that cannot be written is no reason to stop a study."""
    root = Path(root) if root is not None else default_root()
    try:
        (root / LOCKS_DIR).mkdir(parents=True, exist_ok=True)
        probe = root / LOCKS_DIR / ".probe"
        probe.touch()
    except OSError as err:
        return None, f"shared cache off: cannot write {root} ({err.strerror or err})"
    return SharedCache(root, shareable_keys(plan)), ""


# --- which steps ----------------------------------------------------------------------------------
# A step's params that name a model, an adapter or the models it combines; '@<key>' names a step's output.
MODEL_PARAMS = ("init", "model", "base", "adapter", "models", "statistics")


def shareable_keys(plan: Plan) -> frozenset[str]:
    """The steps made from nothing but their key: every model they read is a step's output ('@<key>') and so are
    their dependencies', no tokenizer by path, and old knowledge from the built-in world only."""
    shared: set[str] = set()
    if plan.world_pending:  # the keys after the world are provisional until it is built: only it can be shared yet
        return frozenset(step.key for step in plan.ordered() if step.kind == "world")
    for step in plan.ordered():  # plan order: a step's dependencies come before it
        if closed(step) and all(dep in shared for dep in step.deps):
            shared.add(step.key)
    return frozenset(shared)


def closed(step: Step) -> bool:
    """Whether the step's own params name no model, tokenizer or lm-eval task outside the study."""
    params = step.params
    if "tokenizer" in params:
        return False
    old = params.get("old")
    if old is not None and (old.get("tasks") != "builtin" or old.get("include_path")):
        return False
    return all(_internal(params[name]) for name in MODEL_PARAMS if name in params)


def _internal(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.startswith("@")
    if isinstance(value, dict):
        return all(_internal(value.get(name)) for name in ("model", "adapter"))
    return all(_internal(item) for item in value)


# --- entries ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def key_lock(root: Path, key: str) -> Iterator[None]:
    """One process at a time computes, publishes or removes `key`'s entry (released when the process dies)."""
    with (root / LOCKS_DIR / f"{key}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != ENTRY_FILE)


def valid_entry(cache: SharedCache, key: str) -> Path | None:
    """The entry of `key` if it is whole: its list says this key and every listed file is there at its size."""
    entry = cache.entry(key)
    try:
        listed = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
        files = listed["files"]
        if listed.get("key") != key or not files:
            return None
        for name, size in files.items():
            if (entry / name).stat().st_size != size:
                return None
        if len(_files(entry)) != len(files):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return entry


def link_tree(source: Path, target: Path) -> str:
    """Every file of `source` (but an entry's list) at the same place under `target`, hard-linked where the file
    system allows, copied where not; 'hardlink' or 'copy' (some copied)."""
    how = "hardlink"
    for name in _files(source):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        if not link_or_copy(source / name, target / name):
            how = "copy"
    return how


def publish(cache: SharedCache, key: str, artifact: Path) -> Path:
    """`artifact` (a finished step's dir) into the cache as `key`'s entry, unless a whole one is there. The caller
    holds the key's lock."""
    entry = valid_entry(cache, key)
    if entry is not None:
        return entry
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache.root))
    try:
        link_tree(artifact, tmp)
        files = {str(name): (tmp / name).stat().st_size for name in _files(tmp)}
        atomic_write_json(tmp / ENTRY_FILE, {"key": key, "files": files, "published": time.time()})
        honour_umask(tmp, 0o777)  # mkdtemp's dir is private; the files keep the modes the study gave them
        discard(cache.entry(key))  # a broken entry of the same key
        os.replace(tmp, cache.entry(key))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache.entry(key)


def discard(path: Path) -> None:
    """Remove a dir as one step for readers (renamed away first), then its files."""
    if not path.exists():
        return
    gone = path.with_name(f".{path.name}.gone-{os.getpid()}")
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def link_entry(cache: SharedCache, key: str, final: Path, artifacts: Path) -> str | None:
    """Link `key`'s whole entry into the study's `final` artifact dir and record it; None where there is none (a
    broken one is removed). The caller holds the key's lock."""
    entry = valid_entry(cache, key)
    if entry is None:
        discard(cache.entry(key))
        return None
    with atomic_dir(final) as tmp:
        how = link_tree(entry, tmp)
    atomic_write_json(artifacts / REUSED_DIR / f"{key}.json", {"key": key, "entry": str(entry), "how": how})
    return how


@contextlib.contextmanager
def computed_once(cache: SharedCache | None, key: str, final: Path, artifacts: Path) -> Iterator[bool]:
    """Around a step's computation: yields True where the step's entry was linked into `final` (nothing to compute),
    else False; a step computed in the block is published on leaving it. Under the key's lock, so a study that needs
    a step another is computing waits for it and links it. A step not shared (or no cache) is computed as before."""
    if cache is None or key not in cache.keys:
        _computed_here(key, artifacts)
        yield False
        return
    with key_lock(cache.root, key):
        if link_entry(cache, key, final, artifacts) is not None:
            yield True
            return
        _computed_here(key, artifacts)
        yield False
        if final.is_dir():
            with contextlib.suppress(OSError):  # a full or read-only cache: the study has its artifact all the same
                publish(cache, key, final)


def _computed_here(key: str, artifacts: Path) -> None:
    """The step is computed in the study dir: no record that says it was linked (an earlier, removed artifact was)."""
    with contextlib.suppress(FileNotFoundError):
        (artifacts / REUSED_DIR / f"{key}.json").unlink()


def sync(cache: SharedCache, steps: Sequence[Step], artifacts: Path) -> tuple[list[Step], str]:
    """Before a study runs its steps: each shared step the study has not done that the cache holds is linked in, each
    one it has done that the cache lacks is published (studies run before the cache feed it). Returns the steps
    linked and how ('hardlink', or 'copy' where any was copied)."""
    linked, how = [], "hardlink"
    for step in steps:
        if step.key not in cache.keys:
            continue
        final = artifacts / step.key
        done = final.is_dir()
        if done and (cache.entry(step.key) / ENTRY_FILE).is_file():
            continue
        with key_lock(cache.root, step.key):
            if done:
                with contextlib.suppress(OSError):
                    publish(cache, step.key, final)
                continue
            made = link_entry(cache, step.key, final, artifacts)
        if made is not None:
            linked.append(step)
            how = "copy" if made == "copy" else how
    return linked, how


def world_entry(plan: Plan, root: Path) -> Path | None:
    """The cache's whole entry of the plan's built-in world, if it holds one (the dry run plans with its
    fingerprint)."""
    world = next((step for step in plan.ordered() if step.kind == "world"), None)
    return valid_entry(SharedCache(root, frozenset({world.key})), world.key) if world is not None else None


def cached_keys(plan: Plan, root: Path) -> set[str]:
    """The steps of `plan` a run would link from the cache at `root` rather than compute: shared, with a whole
    entry."""
    cache = SharedCache(root, shareable_keys(plan))
    return {key for key in cache.keys if valid_entry(cache, key) is not None}


def reused_keys(artifacts: Path) -> set[str]:
    """The steps of a study dir linked from the shared cache (their artifacts, if since recomputed, are not)."""
    folder = artifacts / REUSED_DIR
    return {path.stem for path in folder.glob("*.json")} if folder.is_dir() else set()


# --- the `knowstack cache` command --------------------------------------------------------------------
@dataclass(frozen=True)
class EntryInfo:
    key: str
    bytes: int
    linked: bool  # some study dir still links one of its files (a link count above 1)


def entries(root: Path) -> list[EntryInfo]:
    """Every entry of the cache at `root`, by key: the dirs holding an entry's list. Nothing else there is the cache's
    to count or remove: `$KNOWSTACK_CACHE/registries/` (registry/core.py `cache_dir`, a URL registry's objects and
    resumable composes) shares the root where KNOWSTACK_CACHE is set."""
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                        and (p / ENTRY_FILE).is_file()):
        stats = [(entry / name).stat() for name in _files(entry)]
        found.append(EntryInfo(entry.name, sum(s.st_size for s in stats), any(s.st_nlink > 1 for s in stats)))
    return found


def collect_garbage(root: Path) -> list[EntryInfo]:
    """Remove the entries no study dir links (every file's link count 1: its studies are gone, or hold copies) and
    what killed publishers left; returns the entries removed."""
    removed: list[EntryInfo] = []
    if not root.is_dir():
        return removed
    (root / LOCKS_DIR).mkdir(exist_ok=True)
    for info in entries(root):
        if info.linked:
            continue
        with key_lock(root, info.key):
            entry = root / info.key
            if all((entry / name).stat().st_nlink == 1 for name in _files(entry)):
                discard(entry)
                removed.append(info)
    for leftover in [*root.glob(".*.tmp-*"), *root.glob(".*.gone-*")]:
        key = leftover.name[1:].split(".tmp-", 1)[0].split(".gone-", 1)[0]
        with key_lock(root, key):  # a publisher holds it while its temporary dir exists
            shutil.rmtree(leftover, ignore_errors=True)
    return removed


# --- a study's use of the cache (the runner's) ----------------------------------------------------------
class StudyReuse:
    """What a run of a study takes from the cache: the steps it links before running (`link`), those it links while
    running (a step another study published meanwhile), and the words of its progress and summary."""

    def __init__(self, enabled: bool, artifacts: Path, console: Any, root: Path | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.artifacts, self.console = artifacts, console
        self.enabled, self.why_off = enabled, "" if enabled else "off"
        self.before = reused_keys(artifacts)
        self.linked: set[str] = set()  # before the executor ran

    def cache_for(self, plan: Plan) -> SharedCache | None:
        if not self.enabled:
            return None
        cache, why = open_cache(plan, self.root)
        if cache is None:
            self.enabled, self.why_off = False, why
            self.console.print(why, soft_wrap=True)
        return cache

    def link(self, plan: Plan) -> None:
        """Link every shared step of `plan` the cache holds, saying which."""
        cache = self.cache_for(plan)
        if cache is None:
            return
        steps, how = sync(cache, plan.ordered(), self.artifacts)
        if steps:
            self.linked |= {step.key for step in steps}
            names = ", ".join(f"{step.kind} {step.shown}" for step in steps)
            links = "hard links" if how == "hardlink" else "copies: no hard link from the study dir to the cache"
            self.console.print(f"reused from the shared cache {self.root} ({links}): {len(steps)} steps: {names}",
                               soft_wrap=True)

    def counts(self, ran: int, skipped: int) -> tuple[int, int, int]:
        """(ran, already done, reused) of this run, from the executor's ran and skipped: the steps it skipped that
        were linked before it ran, and those it ran that were linked, count as reused."""
        during = reused_keys(self.artifacts) - self.before - self.linked
        return ran - len(during), skipped - len(self.linked), len(self.linked) + len(during)

    def summary(self, reused: int) -> str:
        if not self.enabled:
            return "" if self.why_off == "off" else f", {self.why_off}"
        return f", {reused} reused from the shared cache {self.root}"
