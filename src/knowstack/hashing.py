"""Content hashes: of a file, of a stream, and of a set of files (the registry's and the model cards' scheme)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BLOCK_BYTES = 1 << 20  # read size while hashing or copying: large files never sit whole in memory


def file_sha256(path: Path) -> str:
    with Path(path).open("rb") as handle:
        return stream_sha256(handle)


def stream_sha256(handle: Any) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
        digest.update(block)
    return digest.hexdigest()


# sha256 of files this process hashed while reading them for another purpose (a merge streams every input's
# tensors in file order): (path, device, inode, size, mtime) -> hex digest
_SEEN: dict[tuple[str, int, int, int, int], str] = {}


def _identity(path: Path, stat: os.stat_result) -> tuple[str, int, int, int, int]:
    return str(Path(path).resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def remember_sha256(path: Path, digest: str, stat: os.stat_result) -> None:
    """Record the sha256 of a file whose bytes were all hashed as they were read; `stat` is the file's from before
    the first byte was read, so a file changed while it was read is not remembered."""
    if _identity(path, os.stat(path)) == _identity(path, stat):
        _SEEN[_identity(path, stat)] = digest


def known_sha256(path: Path) -> str:
    """A file's sha256: remembered from a read of all its bytes by this process if the file has not changed
    since (same inode, size and mtime), else read and hashed now. For content hashes that describe a file (a
    model card's inputs); an integrity check that must catch a changed file reads it with file_sha256."""
    return _SEEN.get(_identity(path, os.stat(path))) or file_sha256(path)


def content_hash(files: Mapping[str, str]) -> str:
    """One hash for a set of files: sha256 over "name<TAB>sha256-of-file" lines in sorted name order.

    Hashing each file's digest with its name (rather than the raw bytes run together) keeps file
    boundaries unambiguous and costs nothing: every stored file is hashed anyway."""
    lines = "".join(f"{name}\t{files[name]}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()
