"""O-LoRA: sequential LoRA plus lambda x sum |A_t A_i^T| against every earlier round's adapter (its A matrices
frozen), one run per entry of `lambdas` (a weight for every round, or one per round)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowstack.config import OLoraConfig
from knowstack.errors import KnowstackError
from knowstack.study.graph import ModelRef, lambda_tag, step_ref
from knowstack.study.methods.base import ComposeVariant, Method
from knowstack.study.methods.sequential import TRAIN_KNOBS

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder


def add_olora(builder: PlanBuilder, lambdas: float | list[float], field_index: int = 0) -> None:
    """Round 1 has nothing to be orthogonal to, so it is sequential LoRA's round 1, shared."""
    tag = lambda_tag(lambdas)
    current, adapters = builder.start, []
    for stage, (task, lam) in enumerate(zip(builder.tasks, round_lambdas(builder, lambdas, field_index), strict=True),
                                        start=1):
        olora = {"olora": {"lambda": lam, "previous": [step_ref(a) for a in adapters]}} if adapters else None
        title = builder.round_title("O-LoRA", stage)
        step = builder.train_step(current, task, "lora", extra=olora, label_suffix=f"olora{tag}" if olora else "",
                                  deps=tuple(a.key for a in adapters), title=title)
        adapters.append(step)
        current = ModelRef(step_ref(builder.merge_adapter_step(current, step_ref(step), (step.key,), step.label,
                                                               title)))
        scalar = {} if isinstance(lambdas, list) else {"lambda": float(lambdas)}
        builder.evaluate(current, f"olora-lora-{tag}-{stage}", "olora", "lora", stage, task["name"], scalar)


def round_lambdas(builder: PlanBuilder, lambdas: float | list[float], field_index: int) -> list[float]:
    if not isinstance(lambdas, list):
        return [float(lambdas)] * len(builder.tasks)
    if len(lambdas) != len(builder.tasks):
        raise KnowstackError(f"a per-round list needs one lambda per round ({len(builder.tasks)}), not {len(lambdas)}",
                             field=f"methods.olora.lambdas[{field_index}]")
    return [float(v) for v in lambdas]


def plan(builder: PlanBuilder, section: OLoraConfig) -> None:
    for point in builder.points_of(section, "lora"):
        for index, lambdas in enumerate(section.lambdas):
            with builder.at(point, field_name="methods.olora"):
                add_olora(builder, lambdas, index)


def compose_section(options: Any, kinds: list[str]) -> dict[str, Any]:
    return {"lambdas": [options.olora_lambda]}


METHOD = Method("olora", "olora", "semi", plan, "sequential LoRA, each adapter kept orthogonal to the earlier ones",
                (ComposeVariant("olora", "sequential LoRA, each adapter kept orthogonal to the earlier ones",
                                needs_data=True, knobs=(*TRAIN_KNOBS, "olora_lambda"), section=compose_section),))
