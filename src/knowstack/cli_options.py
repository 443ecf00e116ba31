"""Command-line options derived from the config's declarations, so that a CLI default cannot differ from a
study's: each option defaults to "not given", and the value is built by the config model itself (its default,
its checks, its error naming the option)."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from knowstack.errors import KnowstackError


def _flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def _dest(prefix: str, name: str) -> str:
    return (prefix + name).replace("-", "_")


def _plain(annotation: Any) -> tuple[Any, bool]:
    """The type under Optional[...], and whether None was allowed."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _argparse_kwargs(annotation: Any) -> dict[str, Any] | None:
    """How argparse reads one field; None for a field with no command-line form (a nested model, a mapping)."""
    kind, _ = _plain(annotation)
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(kind))}
    if origin is list:
        (item,) = typing.get_args(kind) or (str,)
        inner = _argparse_kwargs(item)
        return None if inner is None else {"nargs": "+", **inner}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if kind in (int, float, str):
        return {"type": kind}
    if typing.get_origin(kind) is typing.Annotated:
        return _argparse_kwargs(typing.get_args(kind)[0])
    return None


def add_model_options(group: Any, model: type[BaseModel], *, prefix: str = "", only: tuple[str, ...] | None = None,
                      helps: dict[str, str] | None = None) -> None:
    """One option per field of `model` (or of the fields named in `only`): `--<prefix><field>`, default not given,
    its help ending with the declared default."""
    helps = helps or {}
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        kwargs = _argparse_kwargs(field.annotation)
        if kwargs is None:
            continue
        default = field.get_default(call_default_factory=True)
        shown = "not set" if default is None else " ".join(map(str, default)) if isinstance(default, list) else default
        text = helps.get(name, field.description or "")
        text = text if "(default" in text else f"{text} (default {shown})".strip()
        group.add_argument(_flag(prefix, field.alias or name), dest=_dest(prefix, name), default=None,
                           help=text.replace("%", "%%"), **kwargs)


def given_options(args: argparse.Namespace, model: type[BaseModel], *, prefix: str = "") -> dict[str, Any]:
    """The fields of `model` given on the command line (by their field names)."""
    values = {}
    for name in model.model_fields:
        value = getattr(args, _dest(prefix, name), None)
        if value is not None:
            values[name] = value
    return values


def model_from_args(model: type[BaseModel], values: dict[str, Any], *, prefix: str = "") -> Any:
    """The model built from command-line values: its defaults for the rest, its checks, one error naming the option."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        location = [str(part) for part in first["loc"] if not isinstance(part, int)]
        option = _flag(prefix, location[-1]) if location else None
        raise KnowstackError(first["msg"].removeprefix("Value error, "), field=option) from None
