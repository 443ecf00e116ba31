"""Continual merging: one model kept, round by round the running model merges the next task's one-round model (FFT)
or adapter (LoRA), with no data; evaluated after every round like sequential training. Round 1 is the first task's
one-round model itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.combine.merges import METHODS
from knowstack.config import ContinualMergeConfig
from knowstack.errors import KnowstackError
from knowstack.study.graph import ModelRef, step_ref
from knowstack.study.methods.base import Method
from knowstack.study.methods.merge import check_merge, compose_variant, each_merge, step_options

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder

NAME = "continual-merge"


def add_continual_merge(builder: PlanBuilder, finetune: str, method: str, merge: ContinualMergeConfig) -> None:
    check_merge(method, 2, merge, f"methods.{NAME}")
    if METHODS[method].statistics is not None:
        raise KnowstackError(f"'{method}' reads statistics of each model's data, which the running model has not: "
                             "continual merging takes the merges without data", field=f"methods.{NAME}.methods")
    options = step_options(builder, method, merge)
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
    for finetune, method, merge in each_merge(builder, section, f"methods.{NAME}"):
        add_continual_merge(builder, finetune, method, merge)


METHOD = Method(NAME, "continual_merge", "semi", plan, "the running model merges each task's model in turn",
                tuple(compose_variant(f"{NAME}-{method}", method, f"merge the contributions one at a time into the "
                                      f"running model ({method}, each weighted as the models it holds)")
                      for method in ("average", "ties")))
