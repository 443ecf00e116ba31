"""Where the libraries' own chatter goes: deprecation notices and library warnings a user cannot act on
are kept out of the console, which shows knowstack's progress and messages only.

Inside a study step they are written to the step's log file (`STUDY/logs/<step key>.log`); in a
single command (train, eval, merge, ...) they are dropped. knowstack's own warnings still reach the
console.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The loggers of the libraries knowstack drives (transformers keeps its own handler and does not propagate).
LIBRARY_LOGGERS = ("transformers", "datasets", "lm_eval", "lm-eval", "accelerate", "peft", "torch",
                   "huggingface_hub", "safetensors", "evaluate", "absl", "py.warnings")
_OWN = str(Path(__file__).resolve().parent)


def _from_knowstack(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_OWN)


@contextmanager
def library_messages_to(log_file: Path | None) -> Iterator[None]:
    """Library warnings (Python warnings from outside knowstack, and the libraries' log records of level
    WARNING and above) go to `log_file`, appended; with None they are dropped. Restored on exit."""
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        handler.stream.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} started\n")
    else:
        handler = logging.NullHandler()
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
        logger.handlers = [handler]
        logger.propagate = False
        if log_file is not None and (logger.level == logging.NOTSET or logger.level > logging.WARNING):
            logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        console_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' API
            if _from_knowstack(filename) and not issubclass(category, (DeprecationWarning, FutureWarning)):
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
            handler.close()
