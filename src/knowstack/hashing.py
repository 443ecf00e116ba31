"""Content hashes: of a file, of a stream, and of a set of files (the registry's and the model cards' scheme)."""

from __future__ import annotations

import hashlib
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


def content_hash(files: Mapping[str, str]) -> str:
    """One hash for a set of files: sha256 over "name<TAB>sha256-of-file" lines in sorted name order.

    Hashing each file's digest with its name (rather than the raw bytes run together) keeps file
    boundaries unambiguous and costs nothing: every stored file is hashed anyway."""
    lines = "".join(f"{name}\t{files[name]}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()
