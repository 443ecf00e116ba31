"""Where the libraries' own chatter goes: deprecation notices and library warnings a user cannot act on
are kept out of the console, which shows knowstack's progress and messages only.

Inside a study step they are written to the step's log file (`STUDY/logs/<step key>.log`); in a
single command (train, eval, merge, ...) they are dropped. knowstack's own warnings still reach the
console. A call of the Python API (api.py) is as quiet as the command: the libraries' progress bars are off
for the call, and their warnings go to Python's logging, where a program that configured logging (a handler on
the root logger) receives them and any other drops them (`quiet_call`).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

# The loggers of the libraries knowstack drives (transformers keeps its own handler and does not propagate).
LIBRARY_LOGGERS = ("transformers", "datasets", "lm_eval", "lm-eval", "accelerate", "peft", "torch",
                   "huggingface_hub", "safetensors", "evaluate", "absl", "py.warnings")
_OWN = str(Path(__file__).resolve().parent)
_QUIET: ContextVar[bool] = ContextVar("knowstack_quiet_call", default=False)
F = TypeVar("F", bound=Callable[..., Any])


def _from_knowstack(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_OWN)


@contextmanager
def library_messages_to(log_file: Path | None) -> Iterator[None]:
    """Library warnings (Python warnings from outside knowstack, and the libraries' log records of level
    WARNING and above) go to `log_file`, appended; with None they are dropped. Restored on exit."""
    if log_file is None:
        with _library_messages(logging.NullHandler()):
            yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    handler.stream.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} started\n")
    with _library_messages(handler, floor=logging.WARNING):
        yield




class KnowstackDeprecation(DeprecationWarning):
    """An old name of knowstack's own (an API argument): shown to the caller even inside a quiet API call, which
    sends the libraries' deprecations to the log."""

@contextmanager
def _library_messages(handler: logging.Handler | None, floor: int | None = None) -> Iterator[None]:
    """The libraries' loggers (and Python warnings from outside knowstack, as records of `py.warnings`) write to
    `handler` alone; None: they propagate to the root logger's handlers instead of their own. floor: a logger
    set above it (or not set) is lowered to it for the while. Restored on exit."""
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
        logger.handlers = [handler] if handler is not None else []
        logger.propagate = handler is None
        if floor is not None and (logger.level == logging.NOTSET or logger.level > floor):
            logger.setLevel(floor)
    with warnings.catch_warnings():
        console_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' API
            own = _from_knowstack(filename) and not issubclass(category, (DeprecationWarning, FutureWarning))
            if own or issubclass(category, KnowstackDeprecation):
                console_show(message, category, filename, lineno, file, line)
            else:
                logging.getLogger("py.warnings").warning(
                    warnings.formatwarning(message, category, filename, lineno, line).rstrip())

        warnings.showwarning = show
        try:
            yield
        finally:
            for logger, handlers, propagate, level in saved:
                logger.handlers, logger.propagate = handlers, propagate
                logger.setLevel(level)
            if handler is not None:
                handler.close()


# (module, is-enabled, enable, disable) of each library's global progress-bar switch
_BAR_SWITCHES = (
    ("transformers.utils.logging", "is_progress_bar_enabled", "enable_progress_bar", "disable_progress_bar"),
    ("huggingface_hub.utils", "are_progress_bars_disabled", "enable_progress_bars", "disable_progress_bars"),
    ("datasets.utils.tqdm", "are_progress_bars_disabled", "enable_progress_bars", "disable_progress_bars"),
)


@contextmanager
def library_bars_off() -> Iterator[None]:
    """The progress bars of transformers (loading weights), huggingface_hub and datasets ("Generating test
    split") off, each put back as it was on exit. Only libraries imported by now are touched, and transformers
    when it is imported inside (after_transformers_import): importing it costs seconds that a command which
    loads no model (a merge) need not pay; importing datasets too, and the code that imports it later (the
    lm-eval harness) turns its bars off there."""
    restore: list[Callable[[], object]] = []
    inside = [True]

    def turn_off(module_name: str, probe: str, enable: str, disable: str) -> None:
        module = sys.modules[module_name]
        shown = getattr(module, probe)()
        shown = not shown if probe.startswith("are_") else shown
        if shown:
            getattr(module, disable)()
            restore.append(getattr(module, enable))

    for switch in _BAR_SWITCHES:
        if switch[0] in sys.modules:
            turn_off(*switch)
        elif switch[0].startswith("transformers."):
            after_transformers_import(lambda switch=switch: inside[0] and turn_off(*switch))
    try:
        yield
    finally:
        inside[0] = False
        for enable_bars in reversed(restore):
            enable_bars()


# What runs once transformers is first imported (by knowstack's import hook, knowstack/__init__.py)
_AFTER_TRANSFORMERS: list[Callable[[], object]] = []


def after_transformers_import(fn: Callable[[], object]) -> None:
    """fn() now if transformers is imported, else right after its first import: a setting of transformers' own
    (its bars, its log level) made without importing it where nothing else would."""
    if "transformers" in sys.modules:
        fn()
    else:
        _AFTER_TRANSFORMERS.append(fn)


def transformers_imported() -> None:
    """Run what waited for transformers' import (after_transformers_import); knowstack's import hook calls it."""
    while _AFTER_TRANSFORMERS:
        _AFTER_TRANSFORMERS.pop(0)()


def user_logging_configured() -> bool:
    """Whether the program has configured logging (the root logger has a handler, as logging.basicConfig and
    most logging setups give it)."""
    return bool(logging.getLogger().handlers)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """What an API call does around its work: the libraries' progress bars off, their warnings and log records
    to the program's logging where it is configured (as records of their own loggers: `transformers`,
    `datasets`, ...; Python warnings as `py.warnings`), else dropped, as the CLI drops them. knowstack's own
    lines (its training bar, its messages) still reach stderr. Nested calls leave it to the outermost."""
    if _QUIET.get():
        yield
        return
    token = _QUIET.set(True)
    try:
        with ExitStack() as stack:
            stack.enter_context(library_bars_off())
            stack.enter_context(_library_messages(None if user_logging_configured() else logging.NullHandler()))
            yield
    finally:
        _QUIET.reset(token)


def quiet_call(function: F) -> F:
    """An API function that runs the libraries, made as quiet as the CLI (quiet_libraries)."""
    @functools.wraps(function)
    def quiet(*args: Any, **kwargs: Any) -> Any:
        with quiet_libraries():
            return function(*args, **kwargs)

    return quiet  # type: ignore[return-value]
