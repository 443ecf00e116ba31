"""The catalog of methods: one module per method, each declaring its config schema (config.py), how it plans its
steps on a PlanBuilder, which cooperative setting it belongs to, and the registry compose methods it provides.

The study's plan is the catalog applied to a config (study/plan.py build_plan); a registry compose is the same
catalog applied to the registry's contributions (registry/compose.py): one method, run by the same executor.
Adding a method is adding a module here and its schema to config.py MethodsConfig."""

from __future__ import annotations

from knowstack.study.methods import (
    continual_merge,
    ewc,
    joint,
    lwf,
    merge,
    moe,
    olora,
    one_round,
    replay,
    search,
    sequential,
)
from knowstack.study.methods.base import ComposeVariant, Method

# In the order a study plans them (and its report lists them).
CATALOG: dict[str, Method] = {m.name: m for m in (one_round.METHOD, sequential.METHOD, olora.METHOD, joint.METHOD,
                                                    replay.METHOD, merge.METHOD, moe.METHOD, continual_merge.METHOD,
                                                    search.METHOD, ewc.METHOD, lwf.METHOD)}


def compose_variants() -> dict[str, tuple[Method, ComposeVariant]]:
    """Every registry compose method ('merge-ties', 'moe-lora', 'sequential', ...), with the catalog method it runs."""
    return {variant.name: (method, variant) for method in CATALOG.values() for variant in method.compose}


def methods_in(setting: str) -> tuple[str, ...]:
    """The catalog's methods open to a cooperative setting: semi (models shared) or full (data shared too)."""
    return tuple(m.name for m in CATALOG.values() if m.name != "one-round" and (setting == "full" or m.setting == "semi"))


__all__ = ["CATALOG", "ComposeVariant", "Method", "compose_variants", "methods_in"]
