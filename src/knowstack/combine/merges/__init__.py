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

from typing import get_args

from knowstack.combine.merges import (  # noqa: F401  (each module registers its method)
    average,
    breadcrumbs,
    breadcrumbs_ties,
    dare,
    della,
    della_linear,
    fisher,
    karcher,
    model_stock,
    multislerp,
    regmean,
    slerp,
    task_arithmetic,
    task_average,
    ties,
    ties_dare,
)
from knowstack.combine.merges.base import (
    METHODS,
    MergeFn,
    MergeMethod,
    MergeOptions,
    get_method,
    mergekit_aliases,
    option_flag,
    register,
)
from knowstack.config import MergeMethodName

# in config.py's order (a method the config does not name fails here, loudly): the order of the compose variants
for _name in sorted(METHODS, key=get_args(MergeMethodName).index):
    METHODS[_name] = METHODS.pop(_name)

# The settings each method reads: only these are part of its merge step's key (study/methods/merge.py).
MERGE_METHOD_OPTIONS: dict[str, tuple[str, ...]] = {name: method.options for name, method in METHODS.items()}

__all__ = ["METHODS", "MERGE_METHOD_OPTIONS", "MergeFn", "MergeMethod", "MergeOptions", "get_method",
           "mergekit_aliases", "option_flag", "register"]
