"""One round: the base trained on each task alone (FFT or LoRA); every other method's reference point, and the
models (adapters) that merges and MoE combine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowstack.config import MethodConfig
from knowstack.study.graph import ModelRef, step_ref
from knowstack.study.methods.base import Method

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder


def add_one_round(builder: PlanBuilder, finetune: str) -> None:
    for task in builder.tasks:
        step = builder.train_step(builder.base, task, finetune)
        ref = ModelRef(step_ref(step)) if finetune == "fft" else ModelRef(builder.base.model, step_ref(step))
        builder.evaluate(ref, f"one-round-{finetune}-{task['name']}", "one-round", finetune, None, task["name"])


def plan(builder: PlanBuilder, section: MethodConfig) -> None:
    for finetune, _ in builder.each_point(section, "methods.one-round"):
        add_one_round(builder, finetune)


METHOD = Method("one-round", "one_round", "semi", plan, "each task's own fine-tune of the base", section="one-round")
