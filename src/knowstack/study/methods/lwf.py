"""LwF (Li & Hoiem 2017): sequential training whose rounds from 2 on add lambda x the KL from the previous round's
model's answer-token distribution to the model's, on the current task's examples, at a temperature
(train/regularizers.py), one run per entry of `lambdas`. The previous round's model is the round's start, which
the train step already has: no other step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowstack.config import LwfConfig
from knowstack.study.graph import ModelRef, Step, lambda_tag
from knowstack.study.methods.base import Method
from knowstack.study.methods.sequential import add_sequential

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder

NAME = "lwf"


class Lwf:
    """One LwF run's regulariser (study/methods/sequential.py Regulariser)."""

    method, title = NAME, "LwF"

    def __init__(self, lam: float, temperature: float):
        self.lam, self.temperature = float(lam), float(temperature)
        self.tag = lambda_tag(lam)
        self.settings = {"lambda": float(lam)}

    def round_extra(self, stage: int) -> tuple[dict[str, Any], tuple[str, ...]]:
        return {"lwf": {"lambda": self.lam, "temperature": self.temperature}}, ()

    def after_round(self, stage: int, task: dict, init: ModelRef, trained: Step) -> None:
        return None


def plan(builder: PlanBuilder, section: LwfConfig) -> None:
    for finetune, _ in builder.each_point(section, f"methods.{NAME}"):
        for lam in section.lambdas:
            add_sequential(builder, finetune, Lwf(lam, section.temperature))


METHOD = Method(NAME, NAME, "semi", plan, "sequential, each round distilled from the last round's model",
                section="sequential")
