"""A study as a graph of steps (study/graph.py): the catalog of methods (study/methods/) applied to a config, each
method planning its steps on a PlanBuilder (study/builder.py).

The methods import the builder and this module imports the methods, so no module of the two imports the other back.
"""

from __future__ import annotations

from pathlib import Path

from knowstack.config import StudyConfig
from knowstack.errors import KnowstackError
from knowstack.study.builder import PlanBuilder, resolve_task_specs
from knowstack.study.graph import (
    STEP_VERSIONS,
    Evaluation,
    ModelRef,
    Plan,
    Point,
    Step,
    lambda_tag,
    ref_deps,
    step_ref,
)
from knowstack.study.methods import CATALOG

__all__ = ["STEP_VERSIONS", "Evaluation", "ModelRef", "Plan", "PlanBuilder", "Point", "Step", "build_plan",
           "lambda_tag", "ref_deps", "resolve_task_specs", "step_ref"]


def build_plan(config: StudyConfig, out: Path | None = None, world_dir: Path | None = None) -> Plan:
    """The catalog applied to a config: the base's evaluation, then every configured method at every seed. out: the
    study dir, where a built-in world already built gives its fingerprint to every later step's key (without it, or
    before the world is built, those keys are provisional: `world_pending`); world_dir: the same world built
    elsewhere (the shared step cache's entry: the dry run's keys are then those the run will have)."""
    builder = PlanBuilder(config, out, world_dir)
    builder.add_base()
    sections = [(method, getattr(config.methods, method.field)) for method in CATALOG.values()]
    if all(section is None for _, section in sections):
        raise KnowstackError("no methods to run", field="methods")
    for seed in config.seeds if config.seeds is not None else [config.seed]:
        builder.seed = seed
        for method, section in sections:
            if section is not None:
                method.plan(builder, section)
    return builder.plan
