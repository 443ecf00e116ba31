"""Sequential training: one round per task, each from the last round's model; a LoRA round's adapter is merged
into the weights before the next round trains a fresh one (the paper's code). The regularised variants (EWC, LwF:
study/methods/ewc.py, lwf.py) are these rounds with a term added to the loss from round 2 on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from knowstack.config import MethodConfig
from knowstack.study.graph import ModelRef, Step, step_ref
from knowstack.study.methods.base import ComposeVariant, Method

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder


class Regulariser(Protocol):
    """What a regularised sequential method adds to plain rounds: its name in the results and round titles, what its
    rounds from 2 on train with, and what it makes after a round for the next (EWC: the Fisher)."""

    method: str
    title: str
    tag: str  # the run's variant in model names ('100' for lambda 100)
    settings: dict[str, float]  # results columns (lambda)

    def round_extra(self, stage: int) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The train step's extra params from round 2 on, and the keys of the steps it reads."""

    def after_round(self, stage: int, task: dict, init: ModelRef, trained: Step) -> None:
        """Called after each round's train step (trained: the model, or the LoRA adapter on `init`)."""


def add_sequential(builder: PlanBuilder, finetune: str, regulariser: Regulariser | None = None) -> None:
    """Round 1 has no earlier round to keep, so a regularised run's round 1 is plain sequential training's, shared."""
    method = regulariser.method if regulariser else "sequential"
    name = f"{method}-{finetune}" + (f"-{regulariser.tag}" if regulariser and regulariser.tag else "")
    current = builder.start
    for stage, task in enumerate(builder.tasks, start=1):
        title = builder.round_title(regulariser.title if regulariser else "sequential", stage)
        extra, deps = regulariser.round_extra(stage) if regulariser and stage > 1 else (None, ())
        suffix = f"{method}{regulariser.tag}" if extra and regulariser else ""
        step = trained = builder.train_step(current, task, finetune, extra=extra, label_suffix=suffix, deps=deps,
                                            title=title)
        if finetune == "lora":
            step = builder.merge_adapter_step(current, step_ref(step), (step.key,), step.label, title)
        if regulariser is not None:
            regulariser.after_round(stage, task, current, trained)
        current = ModelRef(step_ref(step))
        builder.evaluate(current, f"{name}-{stage}", method, finetune, stage, task["name"],
                         regulariser.settings if regulariser else None)


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
