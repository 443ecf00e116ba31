"""A compose as the study's own catalog applied to the registry's contributions: the method's config section built
from the compose options, a one-method plan on the registry's base whose tasks are the contributions' tasks (and
whose one-round models are the contributed models and adapters), run step by step by the study's executor in the
compose's work dir. A killed compose resumes as a study does: each finished step is kept, keyed by what it is made
from."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowstack.config import StudyConfig, parse_config
from knowstack.errors import KnowstackError
from knowstack.registry.compose_inputs import Build
from knowstack.registry.evaluate import evaluation_harness
from knowstack.study.methods import CATALOG, ComposeVariant
from knowstack.study.plan import ModelRef, Plan, PlanBuilder, Step, step_ref

if TYPE_CHECKING:
    from knowstack.registry.core import Registry
    from knowstack.registry.evaluate import RegisteredTask

TASKS_DIR = "tasks"
PLAN_DIR = "plan"
# Files a study step writes for itself, not part of the model it made.
STEP_FILES = ("step.json",)


def task_entry(b: Build, name: str, task: RegisteredTask) -> dict[str, Any]:
    """A contribution's task as a study task named `name`: its stored splits laid out (linked, verified) in the work
    dir."""
    return task.study_task(b.reg.store, b.work / TASKS_DIR / name, name)


def compose_config(b: Build, catalog: str, variant: ComposeVariant, kinds: list[str]) -> StudyConfig:
    """The one-method study config the compose runs: the registry's base, the contributions' tasks (replayed ones
    first), the training recipe and the method's section from the compose options, the launch settings."""
    from knowstack.config import TrainingConfig

    o = b.options
    replayed = [task_entry(b, task.contributor, task) for task in b.replayed]
    tasks = [task_entry(b, name, task) for name, task in zip(b.names, b.tasks, strict=True)]
    training = {"lr": o.lr, "epochs": o.epochs, "batch_size": o.train_batch_size,
                "micro_batch_size": o.micro_batch_size, "max_length": o.max_length,
                "lora": {**TrainingConfig().lora.model_dump(), "r": o.lora_r, "alpha": o.lora_alpha}}
    launch = b.launch
    raw = {
        "name": f"compose-{variant.name}", "seed": o.seed,
        "base": {"model": str(b.base_dir)},
        "tasks": replayed + tasks,
        "old_knowledge": search_old_knowledge(b) if catalog == "search" else {"tasks": []},
        # how a search scores its trials on the eval splits: as the registry scores (its protocol, lm-eval's BOS)
        "evaluation": {"protocol": b.reg.protocol, **evaluation_harness(b.reg.harness)},
        "training": training,
        "methods": {CATALOG[catalog].name: variant.section(o, kinds)},
        "launch": {"num_processes": launch.num_processes, "accelerate_config": launch.accelerate_config,
                   "cpu": launch.cpu, "mixed_precision": launch.mixed_precision} if launch else {},
    }
    return parse_config(raw, source=f"compose {variant.name} (its options)")


OLD_DIR = "old_knowledge"


def searchable_old_knowledge(reg: Registry) -> dict[str, Any]:
    """The base record's old knowledge, which a search keeps within its budget; one error where a search cannot (a
    compose checks it before it makes its work dir, rather than the search step after the build): no old-knowledge
    tasks, no limit, or a task with no item after the first `limit` ones (the registry's `registry init --limit`, which
    a compose cannot change)."""
    old = reg.base()["settings"].get("old_knowledge")
    if not old or not old.get("tasks"):
        raise KnowstackError("compose --search keeps old knowledge within --max-old-loss: the registry has no "
                             "old-knowledge tasks (registry init --old-tasks ...)", field="method")
    if old.get("limit") is None:
        raise KnowstackError("compose --search scores old knowledge on the items after the first `limit` ones, which "
                             "the gate reads: this registry scores every item (registry init without --limit)",
                             field="method")
    _check_held_out_items(reg, old)
    return old


def _check_held_out_items(reg: Registry, old: dict[str, Any]) -> None:
    """Each stored old-knowledge task whose items can be counted (study/steps.py old_task_items, which the search
    step's slice reads) has some after the first `limit`."""
    from knowstack.study.steps import old_task_items

    files, limit = old.get("files") or {}, old["limit"]
    for task in old["tasks"]:
        name = f"{task}.jsonl"
        if name not in files:
            continue
        with reg.store.view({name: files[name]}) as folder:
            items = old_task_items(folder, task)
        if items is not None and items <= limit:
            raise KnowstackError(f"old-knowledge task '{task}' has {items} items, none after the first {limit} "
                                 f"(registry init --limit {limit}) that every score and the gate read, which compose "
                                 "--search scores on: compose by another --method, or search on a registry made "
                                 "with a lower --limit", field="method")


def search_old_knowledge(b: Build) -> dict[str, Any]:
    """What a search scores old knowledge on: the registry's old-knowledge tasks (registry init --old-tasks),
    their stored files laid out in the work dir; the search reads the items after the first `limit` ones, which are
    what the registry scores every version (and the gate) on."""
    old = searchable_old_knowledge(b.reg)
    files = old.get("files") or {}
    include = str(b.reg.store.lay_out(files, b.work / OLD_DIR)) if files else None
    return {"tasks": list(old["tasks"]), "include_path": include, "limit": old["limit"], **b.reg.harness}


def compose_plan(b: Build, catalog: str, config: StudyConfig) -> tuple[Plan, dict[str, Any]]:
    """The plan, and the model it ends with ({"model", "adapter"} refs)."""
    builder = PlanBuilder(config, b.work / PLAN_DIR)
    chosen = set(b.names)
    builder.replayed = [task for task in builder.tasks if task["name"] not in chosen]
    builder.tasks = [task for task in builder.tasks if task["name"] in chosen]
    builder.plan.task_names = [task["name"] for task in builder.tasks]
    builder.provided = {name: str(path) for name, path in zip(b.names, b.inputs, strict=True)}
    builder.provided_statistics = {name: str(path) for name, path in zip(b.names, b.statistics, strict=True)
                                   if path is not None}
    builder.router_prompts_from = "eval"
    if b.start is not None:
        if b.start_is_adapter:  # training begins from the base with the released adapter folded in
            step = builder.merge_adapter_step(builder.base, str(b.start), (), "start")
            builder.start = ModelRef(step_ref(step))
        else:
            builder.start = ModelRef(str(b.start))
        builder.merge_with = [str(b.start)]
    method = CATALOG[catalog]
    method.plan(builder, getattr(config.methods, method.field))
    if not builder.plan.evaluations:
        raise KnowstackError(f"'{catalog}' planned nothing to build from these contributions", field="method")
    final = builder.plan.steps[builder.plan.evaluations[-1].step]
    return builder.plan, final.params["model"]


def needed_steps(plan: Plan, model: dict[str, Any]) -> list[Step]:
    """The steps the final model is made from, in plan order (no evaluation: the registry scores the version on every
    registered task, registry/evaluate.py)."""
    wanted: set[str] = set()
    stack = [value[1:].split("/", 1)[0] for value in (model.get("model"), model.get("adapter"))
             if isinstance(value, str) and value.startswith("@")]
    while stack:
        key = stack.pop()
        if key not in wanted:
            wanted.add(key)
            stack.extend(plan.steps[key].deps)
    return [step for step in plan.ordered() if step.key in wanted]


def run_compose_plan(b: Build, catalog: str, variant: ComposeVariant) -> None:
    """Plan the method on the contributions, run what the version needs, and leave the version in `b.out`."""
    from knowstack.study.steps import StudyContext, execute

    kinds = [path_kind(path) for path in b.inputs]
    config = compose_config(b, catalog, variant, kinds)
    plan, model = compose_plan(b, catalog, config)
    steps = needed_steps(plan, model)
    ctx = StudyContext(b.work / PLAN_DIR, config)
    for number, step in enumerate(steps, start=1):
        done = ctx.artifact(step.key).is_dir()
        b.say(f"step {number}/{len(steps)} {step.kind}: {step.shown}" + (" (done before, kept)" if done else ""))
        execute(step, ctx)
    built = model["adapter"] or model["model"]
    _copy_model(Path(ctx.resolve(built)), b.out)


def path_kind(path: Path) -> str:
    """"model" for a full model dir, "adapter" for a PEFT adapter (what a contribution or --from version is)."""
    return "model" if (Path(path) / "config.json").is_file() else "adapter"


def _copy_model(source: Path, out: Path) -> None:
    """The final step's artifact, less the study's own step record, as the version's dir (written whole or not at
    all)."""
    import shutil

    from knowstack.atomic import atomic_dir

    with atomic_dir(out) as tmp:
        for item in sorted(source.iterdir()):
            if item.name in STEP_FILES:
                continue
            target = tmp / item.name
            if item.is_dir():
                shutil.copytree(item, target, symlinks=False)
            else:
                shutil.copy2(item, target)
