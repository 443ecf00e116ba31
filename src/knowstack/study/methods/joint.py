"""Joint training: one run on all tasks at once, smaller tasks upsampled (uniform, the paper) or each as large as
it is (proportional); the fully cooperative upper bound."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowstack.config import JointConfig
from knowstack.study.graph import ModelRef, step_ref
from knowstack.study.methods.base import ComposeVariant, Method
from knowstack.study.methods.sequential import TRAIN_KNOBS

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder


def add_joint(builder: PlanBuilder, finetune: str, sampling: str) -> None:
    step = builder.joint_train_step(builder.start, finetune, sampling)
    ref = ModelRef(step_ref(step)) if finetune == "fft" else ModelRef(builder.start.model, step_ref(step))
    trained_on = "+".join(task["name"] for task in builder.tasks)
    builder.evaluate(ref, f"joint-{finetune}", "joint", finetune, None, trained_on)


def plan(builder: PlanBuilder, section: JointConfig) -> None:
    for finetune, _ in builder.each_point(section, "methods.joint"):
        add_joint(builder, finetune, section.sampling)


def compose_section(options: Any, kinds: list[str]) -> dict[str, Any]:
    return {"finetune": [options.finetune], "sampling": options.joint_sampling}


METHOD = Method("joint", "joint", "full", plan, "one training on all the data at once",
                (ComposeVariant("joint", "one training on all the data at once", needs_data=True,
                                knobs=(*TRAIN_KNOBS, "joint_sampling"), section=compose_section),), section="fully cooperative")
