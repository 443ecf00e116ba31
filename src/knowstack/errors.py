"""The one error type users see: a clear message, no traceback (the CLI prints it and exits 2); and the problems
of a command's inputs, listed all at once in one such error (validate.py's checks, combine's compatibility checks);
and the faults of the machine met while running (disk full, read-only, unreadable), worded as one line (exit 1)."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def located(message: str, path: object | None = None, field: str | None = None, item: int | None = None) -> str:
    """'PATH: item N: field 'F': message', each part only where known: how every input problem is worded."""
    where = [str(path)] if path is not None else []
    if item is not None:
        where.append(f"item {item}")
    if field:
        where.append(f"field '{field}'")
    return ": ".join([*where, message])


class KnowstackError(Exception):
    """A problem with the user's input: names the file, the item and the field where there are ones."""

    def __init__(self, message: str, *, path: object | None = None, field: str | None = None,
                 item: int | None = None):
        super().__init__(located(message, path, field, item))
        self.message = message  # without where: the CLI words the field as its option (cli/__init__.py)
        self.path = path
        self.field = field
        self.item = item


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input: the file, the item (index in a list or line of JSON Lines), the field."""

    path: str | None
    message: str
    field: str | None = None
    item: int | None = None

    def __str__(self) -> str:
        return located(self.message, self.path, self.field, self.item)


class InputProblems(KnowstackError):
    """All the problems found in a command's inputs; the CLI prints them and exits 2."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = str(self.problems[0])
        else:
            lines = "\n".join(f"  - {problem}" for problem in self.problems)
            message = f"{len(self.problems)} problems with the inputs; nothing was run:\n{lines}"
        Exception.__init__(self, message)
        self.message = message
        first = self.problems[0] if self.problems else None
        self.path = first.path if first else None
        self.field = first.field if first else None
        self.item = first.item if first else None


def raise_problems(problems: Iterable[Problem]) -> None:
    """Raise one error listing every problem, if there is any (each listed once, in order)."""
    unique = list(dict.fromkeys(problems))
    if unique:
        raise InputProblems(unique)


# What to do about a fault of the machine (not of the input): the OSError kinds a user fixes outside knowstack.
# Not ENOENT: inputs are checked to exist before anything runs, so a missing file later is more likely a bug,
# which keeps its traceback.
FAULT_ADVICE = {
    errno.ENOSPC: "free some space on that disk (or give another output dir)",
    errno.EDQUOT: "free some of your quota on that disk (or give another output dir)",
    errno.EROFS: "give an output dir on a writable disk",
    errno.EACCES: "give this user access to it (or give another path)",
    errno.EPERM: "give this user access to it (or give another path)",
    errno.EIO: "check the disk",
    errno.EMFILE: "raise the limit of open files (ulimit -n)",
}
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


def os_fault(err: BaseException) -> OSError | None:
    """`err` as an OSError of a kind FAULT_ADVICE knows, or None: an OSError itself, or another library's error that
    wraps one in its text (safetensors' Rust writer: 'I/O error: No space left on device (os error 28)')."""
    if isinstance(err, OSError):
        return err if err.errno in FAULT_ADVICE else None
    found = _OS_ERROR_IN_TEXT.search(str(err))
    code = int(found.group(1)) if found else None
    return OSError(code, os.strerror(code)) if code in FAULT_ADVICE else None


def fault_message(err: OSError, where: object | None = None) -> str:
    """One line: the path (the file the OS named, else `where`, the command's output), what failed, what to do."""
    # a copy that fails names both files (shutil: source, destination): a full or read-only disk is the destination's
    written = err.filename2 if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else None
    path = next((p for p in (written, err.filename, where) if p is not None), None)
    return located(f"{err.strerror or err}: {FAULT_ADVICE[err.errno]}", path)
