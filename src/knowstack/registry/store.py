"""The registry's content-addressed object store: `objects/<sha256[:2]>/<sha256>`, one file per distinct content.

A file is hashed first, then copied under a temporary name in its final directory and renamed into place,
so an object either is complete or is absent; one already present is never rewritten (same name, same
bytes), which is what lets many contributors store the same weights at once. Every read goes through
`verified_path`, which re-hashes the file: a tampered or truncated object is one clear error naming it.
`RemoteObjectStore` keeps the same layout at a URL fsspec reaches, read through a local cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knowstack.atomic import honour_umask
from knowstack.errors import KnowstackError
from knowstack.hashing import BLOCK_BYTES, file_sha256, stream_sha256

OBJECTS_DIR = "objects"
_HEX = re.compile(r"^[0-9a-f]{64}$")


def refuse_mismatch(actual: str, sha: str, where: object) -> None:
    if actual != sha:
        raise KnowstackError(f"registry object is corrupt or was tampered with (its sha256 is {actual[:12]}..., "
                             f"expected {sha[:12]}...)", path=where)


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is; without this a crash can lose it.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoredFile:
    """A file under `objects/` as `registry gc` sees it: its name (a sha256, or a leftover temporary name)."""

    name: str
    location: str
    size: int
    modified: float  # seconds since the epoch


class ObjectStore:
    """Files by sha256 under `root/objects`."""

    def __init__(self, root: Path):
        self.root = Path(root) / OBJECTS_DIR

    def path(self, sha: str) -> Path:
        if not _HEX.match(sha):  # a hash from the database is never a path of our choosing
            raise KnowstackError(f"not a sha256 object id: {sha!r}", path=self.root)
        return self.root / sha[:2] / sha

    def put_file(self, source: Path) -> tuple[str, int]:
        """Store `source`'s bytes; returns (sha256, size). Nothing is written when the object exists."""
        source = Path(source)
        sha = file_sha256(source)
        final = self.path(sha)
        if final.is_file():
            return sha, final.stat().st_size
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{sha[:12]}.tmp-", dir=final.parent)
        try:
            copied = self._copy_hashing(source, fd)
            if copied != sha:
                raise KnowstackError("file changed while it was being stored; try again", path=source)
            honour_umask(Path(tmp), 0o444)  # an object never changes: read-only guards against accidental edits
            os.replace(tmp, final)  # a racing writer of the same object writes the same bytes
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(final.parent)
        return sha, final.stat().st_size

    @staticmethod
    def _copy_hashing(source: Path, fd: int) -> str:
        digest = hashlib.sha256()
        with source.open("rb") as src, os.fdopen(fd, "wb") as dst:
            for block in iter(lambda: src.read(BLOCK_BYTES), b""):
                digest.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        return digest.hexdigest()

    def verified_path(self, sha: str) -> Path:
        """The object's file, after checking its bytes still hash to `sha`; the one way objects are read."""
        path = self.path(sha)
        if not path.is_file():
            raise KnowstackError("registry object is missing", path=path)
        refuse_mismatch(file_sha256(path), sha, path)
        return path

    def read_bytes(self, sha: str) -> bytes:
        return self.verified_path(sha).read_bytes()

    def check(self, sha: str) -> None:
        """Re-hash the stored object (what `registry verify` does)."""
        self.verified_path(sha)

    def stored_files(self) -> list[StoredFile]:
        return [StoredFile(path.name, str(path), stat.st_size, stat.st_mtime)
                for path in sorted(self.root.glob("*/*")) if path.is_file() for stat in [path.stat()]]

    def remove(self, stored: StoredFile) -> None:
        Path(stored.location).unlink(missing_ok=True)

    @contextlib.contextmanager
    def view(self, files: Mapping[str, str]) -> Iterator[Path]:
        """A temporary dir holding `files` ({name: sha256}) as links to verified objects, e.g. a loadable model dir.

        Links, not copies: a view of a large model costs one hash pass, no second copy on disk."""
        with tempfile.TemporaryDirectory(prefix="knowstack-view-") as tmp:
            yield self.lay_out(files, Path(tmp))

    def lay_out(self, files: Mapping[str, str], folder: Path) -> Path:
        """`files` ({name: sha256}) as links to verified objects in `folder` (made, or replaced if it exists): a view
        at a path that stays the same, e.g. for a compose whose step keys name it."""
        if folder.is_symlink() or folder.is_file():
            folder.unlink()
        elif folder.is_dir():
            shutil.rmtree(folder)
        for name, sha in files.items():
            target = folder / safe_relative(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(self.verified_path(sha).resolve())
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def safe_relative(name: str) -> Path:
    """A relative path from a record, refused if it could point outside the dir it is laid out in."""
    path = Path(name)
    if not name or path.is_absolute() or any(part in ("", ".", "..") for part in path.parts) or "\\" in name:
        raise KnowstackError(f"unsafe file name {name!r} in a registry record")
    return path


class RemoteObjectStore(ObjectStore):
    """The same store on any file system fsspec reaches (`s3://bucket/reg`, `gs://...`, `file://...`), read
    through a local cache laid out like a local store.

    An object is uploaded under a temporary name and moved into place (on object stores a copy, which
    appears whole or not at all); it is downloaded into the cache, hashed, and renamed there only if it
    matches: a tampered remote object is refused naming its URL, and every read of the cached copy
    re-hashes it exactly as a local store does."""

    def __init__(self, fs: Any, root: str, cache_root: Path, label: str):
        super().__init__(cache_root)
        self.fs, self.remote_root, self.label = fs, f"{root.rstrip('/')}/{OBJECTS_DIR}", label.rstrip("/")

    def remote_path(self, sha: str) -> str:
        self.path(sha)  # validates the id
        return f"{self.remote_root}/{sha[:2]}/{sha}"

    def url(self, sha: str) -> str:
        return f"{self.label}/{OBJECTS_DIR}/{sha[:2]}/{sha}"

    def put_file(self, source: Path) -> tuple[str, int]:
        # Into the cache first, hashed while copied: what is uploaded is a read-only copy that cannot change
        # under us, and the writer's later reads need no download.
        sha, size = super().put_file(source)
        final = self.remote_path(sha)
        folder = final.rsplit("/", 1)[0]
        self.fs.invalidate_cache(folder)
        if self.fs.exists(final):
            return sha, size
        tmp = f"{folder}/.{sha[:12]}.tmp-{uuid.uuid4().hex}"
        self.fs.makedirs(folder, exist_ok=True)
        try:
            self.fs.put_file(str(self.path(sha)), tmp)
            self.fs.mv(tmp, final)  # a racing writer of the same object moves the same bytes
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.rm_file(tmp)
            raise
        return sha, size

    def verified_path(self, sha: str) -> Path:
        cached = self.path(sha)
        if not cached.is_file():
            self._download(sha, cached)  # hashed on the way in: no second pass over a copy just checked
            return cached
        return super().verified_path(sha)

    def check(self, sha: str) -> None:
        """Re-hash the object at the store, streamed (a cached copy says nothing about the store's), then the
        cached copy if there is one."""
        self._require_stored(sha)
        with self.fs.open(self.remote_path(sha), "rb") as handle:
            refuse_mismatch(stream_sha256(handle), sha, self.url(sha))
        if self.path(sha).is_file():
            super().verified_path(sha)

    def _require_stored(self, sha: str) -> None:
        self.fs.invalidate_cache(self.remote_path(sha).rsplit("/", 1)[0])
        if not self.fs.exists(self.remote_path(sha)):
            raise KnowstackError("registry object is missing", path=self.url(sha))

    def _download(self, sha: str, cached: Path) -> None:
        self._require_stored(sha)
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{sha[:12]}.tmp-", dir=cached.parent)
        os.close(fd)
        try:
            self.fs.get_file(self.remote_path(sha), tmp)
            refuse_mismatch(file_sha256(Path(tmp)), sha, self.url(sha))
            honour_umask(Path(tmp), 0o444)
            os.replace(tmp, cached)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def stored_files(self) -> list[StoredFile]:
        self.fs.invalidate_cache(self.remote_root)
        found = self.fs.find(self.remote_root, detail=True) if self.fs.exists(self.remote_root) else {}
        return [StoredFile(path.rsplit("/", 1)[-1], path, int(info.get("size") or 0), self._modified(path, info))
                for path, info in sorted(found.items()) if info.get("type") == "file"]

    def _modified(self, path: str, info: Mapping[str, Any]) -> float:
        # The listing usually says (S3 LastModified, local mtime); asking per file is one request each.
        for key in ("LastModified", "mtime", "updated", "last_modified"):
            value = info.get(key)
            if isinstance(value, (int, float)):
                return float(value)
            if hasattr(value, "timestamp"):
                return value.timestamp()
        return self.fs.modified(path).timestamp()

    def remove(self, stored: StoredFile) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(stored.location)
