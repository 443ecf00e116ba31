"""The merge methods' registry and building blocks under their older name; they live in combine/merges/ (one
module per method)."""

from knowstack.combine.merges import (
           MERGE_METHOD_OPTIONS,
           METHODS,
           MergeFn,
           MergeMethod,
           MergeOptions,
           get_method,
           register,
)
from knowstack.combine.merges.blocks import drop_and_rescale, elect_and_mean, trim_by_magnitude, weighted_mean

__all__ = ["METHODS", "MERGE_METHOD_OPTIONS", "MergeFn", "MergeMethod", "MergeOptions", "drop_and_rescale",
           "elect_and_mean", "get_method", "register", "trim_by_magnitude", "weighted_mean"]
