"""EWC (Kirkpatrick et al. 2017; online, Schwarz et al. 2018): sequential training whose rounds from 2 on add
lambda / 2 x sum F (theta - theta*)^2 toward the previous round's model (train/regularizers.py), one run per entry
of `lambdas`. After each round but the last, a statistics step takes the diagonal Fisher of its model (LoRA: of
the adapted weights, the adapter on the round's start) on the first fisher_examples of the round's task; a round
reads every earlier round's, accumulated with fisher_decay."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowstack.config import EwcConfig
from knowstack.study.graph import ModelRef, Step, lambda_tag, step_ref
from knowstack.study.methods.base import Method
from knowstack.study.methods.sequential import add_sequential

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder

NAME = "ewc"


class Ewc:
    """One EWC run's regulariser (study/methods/sequential.py Regulariser): the Fisher steps made so far."""

    method, title = NAME, "EWC"

    def __init__(self, builder: PlanBuilder, finetune: str, lam: float, section: EwcConfig):
        self.builder, self.finetune, self.lam, self.section = builder, finetune, float(lam), section
        self.tag = lambda_tag(lam)
        self.settings = {"lambda": float(lam)}
        self.fisher: list[Step] = []

    def round_extra(self, stage: int) -> tuple[dict[str, Any], tuple[str, ...]]:
        ewc = {"lambda": self.lam, "fisher": [step_ref(s) for s in self.fisher], "decay": self.section.fisher_decay}
        return {"ewc": ewc}, tuple(s.key for s in self.fisher)

    def after_round(self, stage: int, task: dict, init: ModelRef, trained: Step) -> None:
        if stage == len(self.builder.tasks):
            return  # no round after the last reads its Fisher
        # FFT: the round's model (on the study's base only for its tokenizer, as a one-round model's statistics);
        # LoRA: its adapter on the model the round started from, the Fisher of the adapted weights
        base = init if self.finetune == "lora" else None
        self.fisher.append(self.builder.statistics_step("fisher", self.finetune, step_ref(trained), task,
                                                        self.section.fisher_examples, (trained.key,), base))


def plan(builder: PlanBuilder, section: EwcConfig) -> None:
    for finetune, _ in builder.each_point(section, f"methods.{NAME}"):
        for lam in section.lambdas:
            add_sequential(builder, finetune, Ewc(builder, finetune, lam, section))


METHOD = Method(NAME, NAME, "semi", plan, "sequential, each round held near the last by the Fisher of earlier tasks",
                section="sequential")
