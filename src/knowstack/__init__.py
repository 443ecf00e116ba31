"""knowstack: add new knowledge to an LLM round after round, and measure what it costs."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from knowstack.kernels import pin_mkl
from knowstack.version import __version__ as __version__

pin_mkl()  # before torch's first matrix product: MKL reads it then (knowstack/kernels.py)

# The Python API (api.py, docs/api.md), imported on first use: `import knowstack` stays cheap. `train` and
# `evaluate` are only in knowstack.api: the subpackages of those names would shadow them here once imported.
_API = ("PlannedStep", "StudyResults", "TaskScores", "build_world", "compose", "contribute", "dry_run", "history",
        "init_registry", "load_study", "merge", "mix", "open_registry", "rows_frame", "run_study", "score",
        "study_results", "statistics", "gate")


def __getattr__(name: str) -> Any:
    if name in _API:
        from knowstack import api

        return getattr(api, name)
    raise AttributeError(f"module 'knowstack' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


def _register_model_classes() -> None:
    """knowstack's own model classes (the FFT-MoE options stock Mixtral lacks) join the Auto classes,
    so that AutoModelForCausalLM loads their checkpoints without remote code."""
    try:
        from knowstack.modeling.moe_model import register

        register()
    except Exception as err:  # never let this break the user's import of transformers
        warnings.warn(f"knowstack could not register its MoE model class: {err}", stacklevel=2)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Registers once `transformers` is first imported: importing transformers here would cost every
    `knowstack` command seconds of start-up, including those that never load a model."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_then_register(module: Any) -> None:
                run(module)
                _register_model_classes()
                from knowstack.logs import transformers_imported

                transformers_imported()  # the settings that waited for it (logs.after_transformers_import)

            spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "transformers" in sys.modules:
    _register_model_classes()
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
