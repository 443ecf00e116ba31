"""Merging: the one-round models (FFT) or adapters (LoRA) of every task into one model, with no data, once per
merge method (average, task-average, TIES, DARE, TIES-DARE; combine/merge_methods.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowstack.config import MERGE_METHOD_OPTIONS, MergeConfig
from knowstack.study.graph import ModelRef, Point, step_ref
from knowstack.study.methods.base import ComposeVariant, Method

if TYPE_CHECKING:
    from knowstack.study.plan import PlanBuilder


def add_merge(builder: PlanBuilder, finetune: str, method: str, merge: MergeConfig) -> None:
    """The one-round train steps are the one-round method's own, so they run once."""
    inputs = [builder.one_round_input(task, finetune) for task in builder.tasks]
    seed = builder.seed if merge.seed is None else merge.seed
    settings = {"density": merge.density, "drop_rate": merge.drop_rate, "lambda": merge.lam, "seed": seed}
    params = {
        "method": method,
        "finetune": finetune,
        "base": builder.base.to_dict(),
        "models": [*builder.merge_with, *(ref for ref, _ in inputs)],
        "options": {name: settings[name] for name in MERGE_METHOD_OPTIONS[method]},
    }
    if finetune == "lora" and merge.lora_space_of(method) != "delta":
        # only where it is set: the key of a delta-space merge stays what it was before factors existed
        params["options"]["lora_space"] = merge.lora_space_of(method)
    deps = builder.base_deps() + tuple(key for _, keys in inputs for key in keys)
    label = f"{method}-{finetune}" + ("-factors" if "lora_space" in params["options"] else "")
    step = builder.add_step("merge", label, params, deps)
    trained_on = "+".join(task["name"] for task in builder.tasks)
    builder.evaluate(ModelRef(step_ref(step)), f"merge-{method}-{finetune}", "merge", finetune, None, trained_on)


def plan(builder: PlanBuilder, section: MergeConfig) -> None:
    for finetune in section.finetune:
        for method in section.methods_for(finetune):
            # a point changing only what this merge method does not read would be the same model again
            seen: list[Point] = []
            for point in builder.points_of(section, finetune):
                point = Point.of({k: v for k, v in point.values if k in MERGE_METHOD_OPTIONS[method]})
                if point in seen:
                    continue
                seen.append(point)
                merge = section.model_copy(update={("lam" if k == "lambda" else k): v for k, v in point.values})
                with builder.at(point, field_name="methods.merge", trains=False):
                    add_merge(builder, finetune, method, merge)


def _variant(method: str, summary: str) -> ComposeVariant:
    def section(options: Any, kinds: list[str]) -> dict[str, Any]:
        return {"finetune": ["lora" if set(kinds) == {"adapter"} else "fft"], "methods": [method],
                "density": options.density, "drop_rate": options.drop_rate, "lambda": options.lam}

    knobs = tuple("lam" if option == "lambda" else option for option in MERGE_METHOD_OPTIONS[method])
    return ComposeVariant(f"merge-{method}", summary, kinds=("adapter", "model"), knobs=knobs, section=section)


METHOD = Method("merge", "merge", "semi", plan, "the one-round models or adapters merged into one, without data", (
    _variant("average", "the plain average of the contributions (models and/or adapters)"),
    _variant("task-average", "the average of the contributions' task vectors, scaled by lambda"),
    _variant("ties", "TIES: trim each task vector, elect signs, merge the agreeing entries"),
    _variant("dare", "DARE: drop each task vector's entries at random and rescale, then average"),
    _variant("ties-dare", "DARE's random drop and rescale, then TIES"),
))
