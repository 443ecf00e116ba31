"""Continual merging: one model kept, round by round the running model merges the next task's one-round model (FFT)
or adapter (LoRA), with no data; evaluated after every round like sequential training. Round 1 is the first task's
one-round model itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowstack.config import MERGE_METHOD_OPTIONS, ContinualMergeConfig
from knowstack.study.graph import ModelRef, Point, step_ref
from knowstack.study.methods.base import ComposeVariant, Method

if TYPE_CHECKING:
    from knowstack.study.plan import PlanBuilder

NAME = "continual-merge"


def add_continual_merge(builder: PlanBuilder, finetune: str, method: str, merge: ContinualMergeConfig) -> None:
    seed = builder.seed if merge.seed is None else merge.seed
    settings = {"density": merge.density, "drop_rate": merge.drop_rate, "lambda": merge.lam, "seed": seed}
    options = {name: settings[name] for name in MERGE_METHOD_OPTIONS[method]}
    # the running model and how many models it holds (a compose --from starts from the released version, as one)
    running, held = (builder.merge_with[0], 1) if builder.merge_with else (None, 0)
    running_deps: tuple[str, ...] = ()
    for stage, task in enumerate(builder.tasks, start=1):
        ref, deps = builder.one_round_input(task, finetune)
        if running is None:  # the first task's one-round model itself (LoRA: its adapter on the base)
            running, running_deps, held = ref, deps, 1
            model = ModelRef(ref) if finetune == "fft" else ModelRef(builder.base.model, ref)
        else:
            params = {
                "method": method,
                "finetune": finetune,
                "base": builder.base.to_dict(),
                "models": [running, ref],
                "options": options,
                **({"weights": [float(held), 1.0]} if merge.weighting == "running" else {}),
            }
            step = builder.add_step("merge", f"{NAME}-{method}-{finetune}-{stage}", params,
                                    builder.base_deps() + running_deps + deps)
            running, running_deps, held = step_ref(step), (step.key,), held + 1
            model = ModelRef(running)
        builder.evaluate(model, f"{NAME}-{finetune}-{method}-{stage}", NAME, finetune, stage, task["name"])


def plan(builder: PlanBuilder, section: ContinualMergeConfig) -> None:
    for finetune in section.finetune:
        for method in section.methods_for(finetune):
            seen: list[Point] = []
            for point in builder.points_of(section, finetune):
                point = Point.of({k: v for k, v in point.values if k in MERGE_METHOD_OPTIONS[method]})
                if point in seen:
                    continue
                seen.append(point)
                merge = section.model_copy(update={("lam" if k == "lambda" else k): v for k, v in point.values})
                with builder.at(point, field_name=f"methods.{NAME}", trains=False):
                    add_continual_merge(builder, finetune, method, merge)


def _variant(method: str) -> ComposeVariant:
    def section(options: Any, kinds: list[str]) -> dict[str, Any]:
        return {"finetune": ["lora" if set(kinds) == {"adapter"} else "fft"], "methods": [method],
                "density": options.density, "drop_rate": options.drop_rate, "lambda": options.lam}

    knobs = tuple("lam" if option == "lambda" else option for option in MERGE_METHOD_OPTIONS[method])
    return ComposeVariant(f"{NAME}-{method}", f"merge the contributions one at a time into the running model "
                          f"({method}, each weighted as the tasks it holds)", kinds=("adapter", "model"),
                          knobs=knobs, section=section)


METHOD = Method(NAME, "continual_merge", "semi", plan, "the running model merges each task's model in turn",
                tuple(_variant(m) for m in ("average", "ties")), section="semi-cooperative")
