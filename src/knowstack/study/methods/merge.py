"""Merging: the one-round models (FFT) or adapters (LoRA) of every task into one model, with no data, once per
merge method (average, task-average, TIES, DARE, TIES-DARE, task arithmetic, breadcrumbs, DELLA, SLERP, ...;
combine/merges/, one module per method, each declaring the settings it reads)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from knowstack.combine.merges import MERGE_METHOD_OPTIONS, METHODS, OPTIONS, MergeOptions
from knowstack.config import MergeConfig
from knowstack.errors import KnowstackError
from knowstack.study.graph import ModelRef, Point, step_ref
from knowstack.study.methods.base import ComposeVariant, Method

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder


def add_merge(builder: PlanBuilder, finetune: str, method: str, merge: MergeConfig) -> None:
    """The one-round train steps are the one-round method's own, so they run once."""
    inputs = [builder.one_round_input(task, finetune) for task in builder.tasks]
    check_merge(method, len(builder.merge_with) + len(inputs), merge)
    params = {
        "method": method,
        "finetune": finetune,
        "base": builder.base.to_dict(),
        "models": [*builder.merge_with, *(ref for ref, _ in inputs)],
        "options": step_options(builder, method, merge),
    }
    statistics_keys: tuple[str, ...] = ()
    if METHODS[method].statistics is not None:
        # only where the method reads them: every other merge's key stays what it was
        params["statistics"], statistics_keys = statistics_inputs(builder, finetune, METHODS[method].statistics,
                                                                  inputs, merge)
    if finetune == "lora" and merge.lora_space_of(method) != "delta":
        # only where it is set: the key of a delta-space merge stays what it was before factors existed
        params["options"]["lora_space"] = merge.lora_space_of(method)
    deps = builder.base_deps() + tuple(key for _, keys in inputs for key in keys) + statistics_keys
    label = f"{method}-{finetune}" + ("-factors" if "lora_space" in params["options"] else "")
    step = builder.add_step("merge", label, params, deps)
    trained_on = "+".join(task["name"] for task in builder.tasks)
    builder.evaluate(ModelRef(step_ref(step)), f"merge-{method}-{finetune}", "merge", finetune, None, trained_on)


def statistics_inputs(builder: PlanBuilder, finetune: str, kind: str, inputs: list[tuple[str, tuple[str, ...]]],
                      merge: MergeConfig) -> tuple[list[str], tuple[str, ...]]:
    """Each merged model's statistics dir and the keys of the steps that make them: in a study, one step per
    one-round model computing its `kind` statistics (combine/statistics.py) on the first statistics_examples of its
    own task's training split, as its contributor would on their own data, shared by every merge that reads them;
    in a registry compose, the statistics each contributor contributed."""
    if builder.merge_with:
        raise KnowstackError("a merge that reads statistics of each model's data cannot take a composed version "
                             "as an input (it has no statistics)", field="methods.merge.methods")
    if builder.provided:
        lacking = [task["name"] for task in builder.tasks if task["name"] not in builder.provided_statistics]
        if lacking:
            raise KnowstackError(f"no {kind} statistics were contributed for {', '.join(lacking)}",
                                 field="methods.merge.methods")
        return [builder.provided_statistics[task["name"]] for task in builder.tasks], ()
    steps = [builder.statistics_step(kind, finetune, ref, task, merge.statistics_examples, deps)
             for task, (ref, deps) in zip(builder.tasks, inputs, strict=True)]
    return [step_ref(step) for step in steps], tuple(step.key for step in steps)


def step_options(builder: PlanBuilder, method: str, merge: MergeConfig) -> dict[str, Any]:
    """The settings a merge step of `method` is made with: only those the method reads, so that changing TIES'
    density does not redo the average."""
    seed = builder.seed if merge.seed is None else merge.seed
    settings = {name: getattr(merge, option.field) for name, option in OPTIONS.items()}
    return {name: seed if name == "seed" else settings[name] for name in MERGE_METHOD_OPTIONS[method]}


def check_merge(method: str, models: int, merge: MergeConfig, field: str = "methods.merge") -> None:
    """The method's own checks (how many models it merges, options it cannot run with) at plan time, before any
    step runs, naming the config field."""
    options = MergeOptions(**{option.field: getattr(merge, option.field) for option in OPTIONS.values()})
    try:
        METHODS[method].check_inputs(models)
        METHODS[method].check_options(options)
    except KnowstackError as error:  # the same problem, named by the study config's field
        prefix = field
        message = str(error).removeprefix(f"field '{error.field}': ")
        field = "methods" if error.field in ("models", "weights") else error.field
        raise KnowstackError(f"{message} (this study merges {models} models)", field=f"{prefix}.{field}") from None


def each_merge(builder: PlanBuilder, section: MergeConfig, field_name: str) -> Iterator[tuple[str, str, MergeConfig]]:
    """(finetune, merge method, its settings at a sweep point) for every merge the section asks for, inside the
    builder's context of that point."""
    for finetune in section.finetune:
        for method in section.methods_for(finetune):
            # a point changing only what this merge method does not read would be the same model again
            seen: list[Point] = []
            for point in builder.points_of(section, finetune):
                point = Point.of({k: v for k, v in point.values if k in MERGE_METHOD_OPTIONS[method]})
                if point in seen:
                    continue
                seen.append(point)
                merge = section.model_copy(update={OPTIONS[k].field: v for k, v in point.values})
                with builder.at(point, field_name=field_name, trains=False):
                    yield finetune, method, merge


def plan(builder: PlanBuilder, section: MergeConfig) -> None:
    for finetune, method, merge in each_merge(builder, section, "methods.merge"):
        add_merge(builder, finetune, method, merge)


def _field(option: str) -> str:
    """The config's field (and the compose option) of a merge option: lambda's is lam; seed is seed."""
    return OPTIONS[option].field if option in OPTIONS else option


def compose_variant(name: str, method: str, summary: str) -> ComposeVariant:
    """A registry compose method running `method`: the flat compose options it reads are the method's own."""
    options = tuple(option for option in MERGE_METHOD_OPTIONS[method] if option != "seed")

    def section(given: Any, kinds: list[str]) -> dict[str, Any]:
        return {"finetune": ["lora" if set(kinds) == {"adapter"} else "fft"], "methods": [method],
                **{option: getattr(given, _field(option)) for option in options}}

    knobs = tuple(_field(option) for option in MERGE_METHOD_OPTIONS[method])
    return ComposeVariant(name, summary, kinds=("adapter", "model"), knobs=knobs, section=section)


METHOD = Method("merge", "merge", "semi", plan, "the one-round models or adapters merged into one, without data",
                tuple(compose_variant(f"merge-{name}", name, METHODS[name].summary) for name in METHODS))
