"""The registry's content-addressed object store: `objects/<sha256[:2]>/<sha256>`, one file per distinct content.

A file is hashed first, then copied under a temporary name in its final directory and renamed into place,
so an object either is complete or is absent; one already present is never rewritten (same name, same
bytes), which is what lets many contributors store the same weights at once. Every read goes through
`verified_path`, which re-hashes the file: a tampered or truncated object is one clear error naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from knowstack.errors import KnowstackError

OBJECTS_DIR = "objects"
_BLOCK = 1 << 20
_HEX = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(files: Mapping[str, str]) -> str:
    """One hash for a set of files: sha256 over "name<TAB>sha256-of-file" lines in sorted name order.

    Hashing each file's digest with its name (rather than the raw bytes run together) keeps file
    boundaries unambiguous and costs nothing: every stored file is hashed anyway."""
    lines = "".join(f"{name}\t{files[name]}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is; without this a crash can lose it.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            os.chmod(tmp, 0o444)  # an object never changes: read-only guards against accidental edits
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
            for block in iter(lambda: src.read(_BLOCK), b""):
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
        actual = file_sha256(path)
        if actual != sha:
            raise KnowstackError(f"registry object is corrupt or was tampered with (its sha256 is {actual[:12]}..., "
                                 f"expected {sha[:12]}...)", path=path)
        return path

    def read_bytes(self, sha: str) -> bytes:
        return self.verified_path(sha).read_bytes()

    @contextlib.contextmanager
    def view(self, files: Mapping[str, str]) -> Iterator[Path]:
        """A temporary dir holding `files` ({name: sha256}) as links to verified objects, e.g. a loadable model dir.

        Links, not copies: a view of a large model costs one hash pass, no second copy on disk."""
        with tempfile.TemporaryDirectory(prefix="knowstack-view-") as tmp:
            for name, sha in files.items():
                target = Path(tmp) / safe_relative(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(self.verified_path(sha).resolve())
            yield Path(tmp)


def safe_relative(name: str) -> Path:
    """A relative path from a record, refused if it could point outside the dir it is laid out in."""
    path = Path(name)
    if not name or path.is_absolute() or any(part in ("", ".", "..") for part in path.parts) or "\\" in name:
        raise KnowstackError(f"unsafe file name {name!r} in a registry record")
    return path
