"""Merge methods, mergekit-style: one small module per method, each registering its function and declaring the
options it reads (base.py), on the building blocks they share (blocks.py).

Every method takes the tensors of one parameter from n models (float32, one shape; the caller's to give away:
methods work in place, so a merge holds no second copy of every model's tensor), their weights (positive, one
per model), the options and a random generator, and returns one tensor:

- methods on *task vectors* (`uses_base=True`) get tau_i = theta_i - theta_base (for LoRA, tau_i = scale_i *
  B_i @ A_i) and return the merged task vector; the caller adds the base;
- methods on the *full weights* (`uses_base=False`: average, slerp, karcher) get theta_i (for LoRA, the base's
  weight plus the adapter's delta; a linear one, average, gets the deltas, which is the same thing).

Each module's docstring gives its definition and its mergekit 0.1.5 equivalent; docs/methods.md has the table
and tests/test_merge_oracle.py compares every method mergekit also has with mergekit. Weights of the averaging
methods are relative (only their ratios matter), so a merge of seven models stays on the scale of one task
vector; the summing methods (task-arithmetic, breadcrumbs, della-linear) scale each task vector by its weight.

The declarations are read without torch (the plan and the command line need only names and options): each
method imports its building blocks when it runs.
"""

from __future__ import annotations

import importlib
import pkgutil

from knowstack.combine.merges.base import (
    METHODS,
    OPTIONS,
    MergeFn,
    MergeMethod,
    MergeOptions,
    Option,
    declare,
    get_method,
    mergekit_aliases,
    option_flag,
    register,
)
from knowstack.errors import KnowstackError

# The order the methods are listed in (the config's method names, `--method`, the compose variants, the docs); a
# method not listed here comes after them, by its module's name: adding a method is adding its module.
ORDER = ("average", "task-average", "ties", "dare", "ties-dare", "task-arithmetic", "breadcrumbs", "breadcrumbs-ties",
         "della", "della-linear", "slerp", "multislerp", "karcher", "model-stock", "regmean", "fisher")
NOT_METHODS = ("base", "blocks")  # the declarations and the building blocks


def _import_methods() -> None:
    """Import every module of this package (each registers its method and declares its own options), in ORDER."""
    modules = sorted((m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_METHODS),
                     key=lambda module: (ORDER.index(module.replace("_", "-")) if module.replace("_", "-") in ORDER
                                         else len(ORDER), module))
    for module in modules:
        importlib.import_module(f"{__name__}.{module}")
    for method in METHODS.values():  # an option named but declared nowhere is a typo
        for option in method.options:
            if option != "seed" and option not in OPTIONS:
                raise KnowstackError(f"merge method '{method.name}' reads '{option}', which no module declares",
                                     field=option)
    for name in sorted(METHODS, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        METHODS[name] = METHODS.pop(name)


_import_methods()

# The settings each method reads: only these are part of its merge step's key (study/methods/merge.py).
MERGE_METHOD_OPTIONS: dict[str, tuple[str, ...]] = {name: method.options for name, method in METHODS.items()}
# The options a study may sweep (config.py MergeConfig.SWEEPABLE)
SWEEPABLE_OPTIONS = tuple(name for name, option in OPTIONS.items() if option.sweepable)


def options_table() -> str:
    """docs/methods.md's table of the merge options, from their declarations (scripts/docs_numbers.py
    --merge-options writes it; tests/test_declared_once.py checks it is current)."""
    lines = ["| option | meaning | type | default | range | read by | sweepable |", "|---|---|---|---|---|---|---|"]
    for name, option in OPTIONS.items():
        readers = ", ".join(f"`{m.name}`" for m in METHODS.values() if name in m.options)
        lines.append(f"| `{name}` ({option_flag(name)}) | {option.meaning} | {option.type.__name__} | "
                     f"{option.default:g} | {option.range_text()} | {readers} | {'yes' if option.sweepable else 'no'} |")
    return "\n".join(lines)


__all__ = ["METHODS", "MERGE_METHOD_OPTIONS", "OPTIONS", "ORDER", "SWEEPABLE_OPTIONS", "MergeFn", "MergeMethod",
           "MergeOptions", "Option", "declare", "get_method", "mergekit_aliases", "option_flag", "options_table", "register"]
