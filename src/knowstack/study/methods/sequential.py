"""Sequential training: one round per task, each from the last round's model; a LoRA round's adapter is merged
into the weights before the next round trains a fresh one (the paper's code)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowstack.config import MethodConfig
from knowstack.study.graph import ModelRef, step_ref
from knowstack.study.methods.base import ComposeVariant, Method

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder


def add_sequential(builder: PlanBuilder, finetune: str) -> None:
    current = builder.start
    for stage, task in enumerate(builder.tasks, start=1):
        title = builder.round_title("sequential", stage)
        step = builder.train_step(current, task, finetune, title=title)
        if finetune == "lora":
            step = builder.merge_adapter_step(current, step_ref(step), (step.key,), step.label, title)
        current = ModelRef(step_ref(step))
        builder.evaluate(current, f"sequential-{finetune}-{stage}", "sequential", finetune, stage, task["name"])


def plan(builder: PlanBuilder, section: MethodConfig) -> None:
    for finetune, _ in builder.each_point(section, "methods.sequential"):
        add_sequential(builder, finetune)


def training_section(options: Any, kinds: list[str]) -> dict[str, Any]:
    return {"finetune": [options.finetune]}


TRAIN_KNOBS = ("finetune", "lr", "epochs", "train_batch_size", "micro_batch_size", "max_length", "lora_r",
               "lora_alpha", "seed")
METHOD = Method("sequential", "sequential", "semi", plan, "each task in turn, from the last round's model",
                (ComposeVariant("sequential", "train on each contribution's data in turn", needs_data=True,
                                knobs=TRAIN_KNOBS, section=training_section),), section="sequential")
