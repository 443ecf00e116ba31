"""The one error type users see: a clear message, no traceback (the CLI prints it and exits 2)."""

from __future__ import annotations


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
        self.path = path
        self.field = field
        self.item = item
