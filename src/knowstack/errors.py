"""The one error type users see: a clear message, no traceback (the CLI prints it and exits 2)."""

from __future__ import annotations


class KnowstackError(Exception):
    """A problem with the user's input: names the file and the field where there is one."""

    def __init__(self, message: str, *, path: object | None = None, field: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if field:
            where.append(f"field '{field}'")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path = path
        self.field = field
