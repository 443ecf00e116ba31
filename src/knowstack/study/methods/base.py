"""What a catalog entry declares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder


@dataclass(frozen=True)
class ComposeVariant:
    """A registry compose method this catalog method provides: its name, what it builds from (the contribution kinds
    it combines, or their training data), the flat compose options it reads (registry/compose.py ComposeOptions), and
    how those options become the method's config section."""

    name: str
    summary: str
    kinds: tuple[str, ...] = ()  # contribution kinds combined ("adapter", "model"); () for training methods
    needs_data: bool = False
    knobs: tuple[str, ...] = ()
    # knobs added later: in a version's settings (its key) only when not their default, so that a version composed
    # before they existed keeps its key (as a study step's options added later, study/methods/moe.py)
    keyed_when_set: tuple[str, ...] = ()
    section: Callable[[Any, list[str]], dict[str, Any]] = field(default=lambda options, kinds: {})


@dataclass(frozen=True)
class Method:
    """name: its key under `methods:` (and the results' `method` column); field: MethodsConfig's attribute;
    setting: the cooperative setting it is open to (semi: contributors share models; full: their data too);
    plan(builder, section): adds its steps and evaluations, for every finetune / variant and sweep point, at the
    builder's seed; compose: the registry compose methods it provides; section: where the report shows it."""

    name: str
    field: str
    setting: Literal["semi", "full"]
    plan: Callable[[PlanBuilder, Any], None]
    summary: str
    compose: tuple[ComposeVariant, ...] = ()
    # the report's section that shows it (report/runs.py SETTINGS): one-round, sequential, semi-cooperative or
    # fully cooperative
    section: str = "semi-cooperative"
