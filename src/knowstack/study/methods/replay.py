"""Sequential training with replay: round t also trains on fraction x |task t| examples of every earlier task
(upsampled when an earlier task is smaller), drawn once per round from the seed (the paper: 10%)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowstack.config import ReplayConfig
from knowstack.study.graph import ModelRef, step_ref
from knowstack.study.methods.base import ComposeVariant, Method
from knowstack.study.methods.sequential import TRAIN_KNOBS

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder


def add_replay(builder: PlanBuilder, finetune: str, fraction: float) -> None:
    """Round 1 has no earlier task (unless the builder replays tasks from before it), so it is sequential
    training's round 1, shared."""
    current = builder.start
    for stage, task in enumerate(builder.tasks, start=1):
        earlier = [*builder.replayed, *builder.tasks[: stage - 1]]
        mixture = {"mixture": {"kind": "replay", "fraction": fraction, "earlier": earlier}} if earlier else None
        title = builder.round_title("replay", stage)
        step = builder.train_step(current, task, finetune, extra=mixture, label_suffix="replay" if earlier else "",
                                  title=title)
        if finetune == "lora":
            step = builder.merge_adapter_step(current, step_ref(step), (step.key,), step.label, title)
        current = ModelRef(step_ref(step))
        builder.evaluate(current, f"replay-{finetune}-{stage}", "replay", finetune, stage, task["name"])


def plan(builder: PlanBuilder, section: ReplayConfig) -> None:
    for finetune, point in builder.each_point(section, "methods.replay"):
        add_replay(builder, finetune, point.get("fraction", section.fraction))


def compose_section(options: Any, kinds: list[str]) -> dict[str, Any]:
    return {"finetune": [options.finetune], "fraction": options.replay_fraction}


METHOD = Method("replay", "replay", "full", plan, "sequential, replaying a fraction of every earlier task",
                (ComposeVariant("replay", "sequential, replaying a fraction of every earlier task", needs_data=True,
                                knobs=(*TRAIN_KNOBS, "replay_fraction"), section=compose_section),), section="fully cooperative")
