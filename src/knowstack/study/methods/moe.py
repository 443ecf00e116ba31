"""Mixing: the one-round models (FFT-MoE, Mixtral-style) or adapters (LoRA-MoE, routed per token) of every task, or
of `tasks`, as the experts of one mixture, its routers built with no data but a few prompts per expert, and
optionally trained alone (combine/moe.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowstack.config import MoeConfig
from knowstack.errors import KnowstackError
from knowstack.study.graph import ModelRef, step_ref
from knowstack.study.methods.base import ComposeVariant, Method

if TYPE_CHECKING:
    from knowstack.study.builder import PlanBuilder


def add_moe(builder: PlanBuilder, experts: str, moe: MoeConfig, name: str = "", field: str = "methods.moe") -> None:
    """The one-round train steps are the one-round method's own, so they run once. name: the mixture's name in a
    list of mixtures (its model is then moe-<experts>-<name>); field: its config field, for errors."""
    tasks = moe_tasks(builder, moe, experts, field)
    n_experts = len(tasks) + (moe.base_expert == "routed")
    every_expert = experts == "lora" and moe.router == "moetify"  # moetify's LoRA-MoE: its default top-k, all
    if moe.router != "none" and not every_expert and moe.top_k > n_experts:
        raise KnowstackError(f"top_k is {moe.top_k} but there are {n_experts} experts", field=f"{field}.top_k")
    if moe.router == "uniform" and moe.top_k < n_experts and moe.router_training is None:
        raise KnowstackError("a uniform router ties every expert, so top-k would always pick the first k: use "
                             "top_k = the number of experts, router_training, or router: none",
                             field=f"{field}.router")
    inputs = [builder.one_round_input(task, experts) for task in tasks]
    if moe.router == "gates":  # each adapter the study trains gets the gates its contributor trains on its task;
        # a provided adapter (a registry contribution) comes with the gates its contributor trained
        inputs = [_gated(builder, task, ref, keys, moe) if keys else (ref, keys)
                  for task, (ref, keys) in zip(tasks, inputs, strict=True)]
    # what the mixture is made with; the sweep itself and an unset `attention` (an option added later) are
    # left out, so that the key of a mixture made before they existed stays its key
    options = moe.model_dump(mode="json", exclude={"experts", "tasks", "seed", "sweep", "points", "name"})
    for later in ("attention", "routing", "temperature"):  # options added later: left out when unset
        if options.get(later) is None:
            options.pop(later, None)
    options.pop("gate_training", None)  # the gate steps' settings, in their own keys (deps of this step)
    for later in ("router_dtype", "router_init"):  # LoRA-MoE options added later: in the key only when not the default
        if experts == "fft" or options.get(later) == MoeConfig.model_fields[later].default:
            options.pop(later, None)
    if experts == "lora":
        options["shared"] = "base"  # an FFT-MoE option: a LoRA-MoE keeps the base's weights
    if every_expert:
        options["top_k"] = n_experts  # as combine/moe.py's moetify_top_k: the step says the top-k it mixes with
    params = {
        "experts": experts,
        "base": builder.base.to_dict(),
        "models": [ref for ref, _ in inputs],
        "tasks": tasks,
        "options": options,
        "seed": builder.seed if moe.seed is None else moe.seed,
        "max_length": builder.config.training.max_length,
        **({"prompts_from": builder.router_prompts_from} if builder.router_prompts_from else {}),
    }
    deps = builder.base_deps() + tuple(key for _, keys in inputs for key in keys)
    step = builder.add_step("moe", f"{experts}-{moe.router}", params, deps)
    ref = ModelRef(step_ref(step)) if experts == "fft" else ModelRef(builder.base.model, step_ref(step))
    builder.evaluate(ref, f"moe-{experts}" + (f"-{name}" if name else ""), "moe", experts, None,
                     "+".join(task["name"] for task in tasks))


def _gated(builder: PlanBuilder, task: dict, adapter: str, keys: tuple[str, ...], moe: MoeConfig) -> tuple[str, tuple[str, ...]]:
    """A `gate` step: the adapter of `task` with gate vectors trained on the task's training data (PHATGOOSE's
    per-contributor gates, train/gate_training.py); its artifact is the adapter dir plus the gates."""
    from knowstack.config import GateTrainingConfig

    settings = (moe.gate_training or GateTrainingConfig()).model_dump(mode="json")
    params = {"base": builder.base.to_dict(), "adapter": adapter, "task": task, "settings": settings,
              "max_length": builder.config.training.max_length,
              "seed": builder.seed if moe.seed is None else moe.seed}
    step = builder.add_step("gate", task["name"], params, builder.base_deps() + keys)
    return step_ref(step), (step.key,)


def moe_tasks(builder: PlanBuilder, moe: MoeConfig, experts: str, field: str = "methods.moe") -> list[dict]:
    listed = moe.tasks.get(experts) if isinstance(moe.tasks, dict) else moe.tasks
    if listed is None:
        return builder.tasks
    known = {task["name"]: task for task in builder.tasks}
    unknown = [name for name in listed if name not in known]
    if unknown:
        field = f"{field}.tasks" + (f".{experts}" if isinstance(moe.tasks, dict) else "")
        raise KnowstackError(f"unknown task '{unknown[0]}' (the study's tasks: {', '.join(known)})", field=field)
    return [known[name] for name in listed]


def plan(builder: PlanBuilder, section: MoeConfig | list[MoeConfig]) -> None:
    if not isinstance(section, list):
        plan_mixture(builder, section)
        return
    names = [mixture.name or mixture.router for mixture in section]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise KnowstackError(f"two mixtures are named '{name}': give each a unique name (default: its router)",
                                 field=f"methods.moe[{i}].name")
    for i, (mixture, name) in enumerate(zip(section, names, strict=True)):
        plan_mixture(builder, mixture, name, f"methods.moe[{i}]")


def plan_mixture(builder: PlanBuilder, section: MoeConfig, name: str = "", field: str = "methods.moe") -> None:
    for experts in section.experts:
        for point in builder.points_of(section, experts):
            moe = section.model_copy(update={k: int(v) for k, v in point.values})
            with builder.at(point, field_name=field, trains=False):
                add_moe(builder, experts, moe, name, field)


LORA_MOE_KNOBS = ("router_dtype", "router_init")  # a LoRA-MoE's own (MoeConfig's), added later


def _variant(experts: str, kind: str, summary: str) -> ComposeVariant:
    later = LORA_MOE_KNOBS if experts == "lora" else ()

    def section(options: Any, kinds: list[str]) -> dict[str, Any]:
        training = None
        if options.router_steps > 0:
            training = {"steps": options.router_steps, "lr": options.router_lr,
                        "examples_per_task": options.router_examples_per_task}
        return {"experts": [experts], "top_k": options.top_k, "router": options.router,
                "prompts_per_expert": options.prompts_per_expert, "router_training": training,
                **{knob: getattr(options, knob) for knob in later}}

    knobs = ("top_k", "router", "prompts_per_expert", "router_steps", "router_lr", "router_examples_per_task",
             "max_length", "seed", *later)
    return ComposeVariant(f"moe-{experts}", summary, kinds=(kind,), knobs=knobs, section=section,
                          keyed_when_set=later)


METHOD = Method("moe", "moe", "semi", plan, "the one-round models or adapters as the experts of one mixture", (
    _variant("lora", "adapter", "the LoRA adapters as experts of one LoRA-MoE"),
    _variant("fft", "model", "the fine-tuned models' MLPs as experts of one MoE"),
))
