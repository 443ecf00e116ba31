"""Write artifacts under a temporary name and rename them when complete, so nothing is half-written."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Why a file system refuses a hard link (another file system, no links there, too many links to the file): copy then.
NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})


def link_or_copy(source: Path, target: Path) -> bool:
    """`source` at `target`, hard-linked where the file system allows (no byte copied: a model's weights cost no
    disk twice), copied where not; whether it was linked. A symlink is followed (a Hugging Face cache's blob)."""
    try:
        os.link(source, target)
        return True
    except OSError as err:
        if err.errno not in NO_LINK:
            raise
    shutil.copy2(source, target)
    return False


def current_umask() -> int:
    """The process's umask. Read from /proc where it is there: setting it to read it back (the only portable way)
    would leave other threads creating files under the wrong mask for a moment."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def honour_umask(path: Path, mode: int | None = None) -> None:
    """Give `path`, and everything under it if it is a dir, the mode open() and mkdir() would: 0o666 for a file
    (0o777 for a dir or an executable) less the umask, a read-only file staying read-only; or `mode` less the
    umask (`path` alone). mkstemp and mkdtemp make theirs private, safetensors writes 0o600, and a rename keeps
    the mode: without this an artifact would be unreadable to the rest of a team sharing the dir. A file with other
    names (a hard link, link_or_copy's) keeps its mode: it is theirs too (a base's weights, a shared cache entry's
    file), and may not be this process's to change."""
    mask = current_umask()
    path = Path(path)
    if mode is not None:
        os.chmod(path, mode & ~mask)
        return
    items = [path]
    if path.is_dir():
        items += [Path(top, name) for top, dirs, files in os.walk(path) for name in dirs + files]
    for item in items:
        info = item.lstat()
        now = info.st_mode
        if stat.S_ISDIR(now):
            os.chmod(item, 0o777 & ~mask)
        elif stat.S_ISREG(now) and info.st_nlink == 1:
            wanted = 0o777 if now & stat.S_IXUSR else 0o666
            os.chmod(item, (wanted if now & stat.S_IWUSR else wanted & ~0o222) & ~mask)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; it becomes `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as err:
        _name_final(err, final)
        raise
    try:
        yield tmp
        honour_umask(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as err:
        _name_final(err, final)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as err:
        _name_final(err, path)
        raise
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        honour_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            _name_final(err, path)
        raise


def _name_final(err: OSError, final: Path) -> None:
    """A failed write names the artifact the user asked for, not its temporary name (nor nothing, as a full disk's
    write() does), so the message says where space or permission is missing."""
    temporary = f"{os.sep}.{final.name}.tmp-"
    if err.filename is None or temporary in str(err.filename):
        err.filename = str(final)
    if err.filename2 is not None and temporary in str(err.filename2):  # a copy's destination
        err.filename2 = str(final)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
