"""A study as a graph of steps: build the base, train, merge adapters, evaluate.

Each step is data (a kind, its parameters, the keys of the steps it reads), so the plan can be
printed, hashed and executed by any executor. A step's key is a hash of what it is made from:
the same training on the same model and data is one step however many methods need it (round 1
of a sequential run *is* the one-round model of the first task), and a finished step is never
redone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knowstack.config import (
    LORA_ONLY_SWEEP,
    MERGE_METHOD_OPTIONS,
    SWEEP_COLUMNS,
    MergeConfig,
    MoeConfig,
    StudyConfig,
    Sweepable,
    TrainingConfig,
)
from knowstack.data.tasks import TaskSpec, task_from_config
from knowstack.errors import KnowstackError

# Bump when what a kind of step writes changes, so stale artifacts are not reused. train and moe 2: an
# overlong example loses the middle of its prompt, not the end of its answer (data/truncation.py); eval 3:
# that, and every evaluation keeps its per-item scores.
STEP_VERSIONS = {"world": 1, "train": 2, "merge-adapter": 1, "eval": 3, "merge": 1, "moe": 2}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Step:
    """A unit of work. Its label is derived from content too (never from which method asked for
    it), so that adding a method to a config never renames, and so never redoes, existing work."""

    kind: str
    label: str
    params: dict[str, Any]
    deps: tuple[str, ...] = ()
    key: str = field(init=False)

    def __post_init__(self) -> None:
        version = STEP_VERSIONS[self.kind]
        digest = _digest({"kind": self.kind, "v": version, "params": self.params, "deps": self.deps})
        object.__setattr__(self, "key", f"{self.kind}-{self.label}-{digest}")


@dataclass(frozen=True)
class ModelRef:
    """A model to load: a full model (a step's output or a path/hub id) and optionally an adapter.
    world: the built-in world's fingerprint when the model is its base, so that it is in the key of
    every step made from the world (a step made from another's output has that step's key in its own)."""

    model: str
    adapter: str | None = None
    world: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        ref = {"model": self.model, "adapter": self.adapter}
        return ref | {"world": self.world} if self.world else ref


@dataclass(frozen=True)
class Point:
    """One setting of a method in a sweep: the values it changes from the method's own setting (none: the
    method's own run, the one compared 'at equal settings')."""

    values: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, settings: dict[str, float]) -> Point:
        order = {name: i for i, name in enumerate(SWEEP_COLUMNS)}
        return cls(tuple(sorted(((k, float(v)) for k, v in settings.items()), key=lambda kv: order[kv[0]])))

    @property
    def name(self) -> str:
        """'lr=0.001,rank=16'; '' for the method's own setting."""
        return ",".join(f"{name}={value:g}" for name, value in self.values)

    def named(self, model: str) -> str:
        """A model's name at this point: 'one-round-fft-stance@lr=0.001'."""
        return f"{model}@{self.name}" if self.values else model

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.values).get(name, default)


@dataclass(frozen=True)
class Evaluation:
    """One named model of the study and the eval step that scores it: the rows of results.csv.
    point: the sweep point's name ('' for the method's own setting); settings: the values it sets, and
    O-LoRA's lambda (the results' setting columns)."""

    model: str
    method: str
    finetune: str
    stage: int | None
    step: str
    trained_on: str = ""
    point: str = ""
    settings: tuple[tuple[str, float], ...] = ()
    seed: int | None = None  # the training seed, where the config repeats its models over `seeds`


@dataclass
class Plan:
    config: StudyConfig
    steps: dict[str, Step] = field(default_factory=dict)
    evaluations: list[Evaluation] = field(default_factory=list)
    task_names: list[str] = field(default_factory=list)
    # The built-in world's fingerprint (world.json), once it is built; until then every later step's key
    # is provisional (`world_pending`), and the runner builds the world and plans again.
    world_fingerprint: str | None = None
    world_pending: bool = False

    def add(self, step: Step) -> Step:
        for dep in step.deps:
            if dep not in self.steps:
                raise AssertionError(f"step {step.key} depends on unknown step {dep}")
        self.steps.setdefault(step.key, step)
        return self.steps[step.key]

    def ordered(self) -> list[Step]:
        return list(self.steps.values())  # insertion order is a topological order by construction


def step_ref(step: Step, sub: str = "") -> str:
    """A reference to a step's output dir, resolved by the runner: '@<key>' or '@<key>/<sub>'."""
    return f"@{step.key}/{sub}" if sub else f"@{step.key}"


def ref_deps(ref: ModelRef) -> tuple[str, ...]:
    keys = []
    for value in (ref.model, ref.adapter):
        if value and value.startswith("@"):
            keys.append(value[1:].split("/", 1)[0])
    return tuple(keys)


class PlanBuilder:
    """Turns a config into steps; one small method per study method."""

    def __init__(self, config: StudyConfig, out: Path | None = None):
        self.config = config
        self.out = out
        self.plan = Plan(config)
        self.world: Step | None = None
        self.point = Point()
        self.seed = config.seed  # the training seed of the models added now (the world's is config.seed)
        self.training = config.training
        self.base = self._base_model()
        self.tasks = self._tasks()
        self.plan.task_names = [task["name"] for task in self.tasks]
        self.budgets = {} if config.builtin_tasks else {cfg.name: cfg.budget() for cfg in config.tasks}

    # --- the base and the tasks -------------------------------------------------------------
    def _base_model(self) -> ModelRef:
        base = self.config.base
        if base.builtin is not None:
            from knowstack.builtin.world import WORLD_VERSION

            self.world = self.plan.add(
                Step("world", base.builtin, {"preset": base.builtin, "seed": self.config.seed, "version": WORLD_VERSION})
            )
            fingerprint = built_world_fingerprint(self.out / "artifacts" / self.world.key) if self.out else None
            self.plan.world_fingerprint, self.plan.world_pending = fingerprint, fingerprint is None
            return ModelRef(step_ref(self.world, "model"), world=fingerprint or "pending")
        return ModelRef(base.model)

    def _tasks(self) -> list[dict]:
        """Each task as the parameters a step hashes: name, and what its data is (a fingerprint)."""
        if self.config.builtin_tasks:
            from knowstack.builtin.world import BUILTIN_TASKS

            assert self.world is not None
            # The world is deterministic in its key, so the key fingerprints its tasks' data.
            names = self.config.builtin_task_names([task.name for task in BUILTIN_TASKS])
            return [{"name": name, "source": "builtin", "data": self.world.key} for name in names]
        return [
            {"name": spec.name, "source": "config", "data": spec.fingerprint()}
            for spec in (task_from_config(cfg) for cfg in self.config.tasks)
        ]

    def _eval_params(self) -> dict[str, Any]:
        cfg = self.config
        params = {
            "tasks": self.tasks,
            "old": cfg.old_knowledge.model_dump(mode="json"),
            "evaluation": cfg.evaluation.model_dump(mode="json"),
        }
        # A task's own scoring protocol changes its scores, not its training: it keys the evaluations only.
        own = {task.name: task.protocol for task in cfg.tasks if task.protocol} if isinstance(cfg.tasks, list) else {}
        return {**params, "protocols": own} if own else params

    # --- sweep points ---------------------------------------------------------------------------
    @contextmanager
    def at(self, point: Point, *, field_name: str, trains: bool = True) -> Iterator[PlanBuilder]:
        """Steps added inside are the method's at `point`: its models are named with it and, when the method
        trains (`trains`), trained with the point's training settings."""
        if trains:
            self.training = training_at(self.config, point, field_name)
        self.point = point
        try:
            yield self
        finally:
            self.point, self.training = Point(), self.config.training

    # --- steps ---------------------------------------------------------------------------------
    def label_of(self, ref: ModelRef) -> str:
        """A readable name for a model, from the step that made it: 'base', 'fft-stance', ..."""
        made_by = ref.adapter or ref.model
        if not made_by.startswith("@"):
            return "base"
        step = self.plan.steps[made_by[1:].split("/", 1)[0]]
        return "base" if step.kind == "world" else step.label

    def train_step(
        self,
        init: ModelRef,
        task: dict,
        finetune: str,
        *,
        extra: dict[str, Any] | None = None,
        label_suffix: str = "",
        deps: tuple[str, ...] = (),
    ) -> Step:
        """extra: what makes a variant differ from plain training on `task` (a replay mixture, an
        O-LoRA penalty); without it the step, and so its key, is exactly plain training's."""
        label = f"{finetune}-{task['name']}" + (f"-{label_suffix}" if label_suffix else "")
        params = {
            "init": init.to_dict(),
            "task": task,
            "finetune": finetune,
            "training": training_params(self._training_for(task), finetune),
            "seed": self.seed,
            **(extra or {}),
        }
        return self.plan.add(Step("train", label, params, ref_deps(init) + deps))

    def _training_for(self, task: dict) -> TrainingConfig:
        """The recipe with the task's own budget (epochs or max_steps), unless the sweep point sets one: a task
        without a budget trains, and so hashes, exactly as before budgets existed."""
        budget = self.budgets.get(task["name"], {})
        if not budget or self.point.get("epochs") is not None or self.point.get("max_steps") is not None:
            return self.training
        return self.training.model_copy(update=budget)

    def joint_train_step(self, init: ModelRef, finetune: str, sampling: str) -> Step:
        """One run on all tasks at once; the executor draws the mixture from `tasks` and the seed."""
        params = {
            "init": init.to_dict(),
            "tasks": self.tasks,
            "mixture": {"kind": "joint", "sampling": sampling},
            "finetune": finetune,
            "training": training_params(self.training, finetune),
            "seed": self.seed,
        }
        return self.plan.add(Step("train", f"{finetune}-joint-{sampling}", params, ref_deps(init)))

    def merge_adapter_step(self, init: ModelRef, adapter: Step) -> Step:
        params = {"init": init.to_dict(), "adapter": step_ref(adapter)}
        return self.plan.add(Step("merge-adapter", adapter.label, params, ref_deps(init) + (adapter.key,)))

    def evaluate(
        self, ref: ModelRef, name: str, method: str, finetune: str, stage: int | None, trained_on: str = "",
        settings: dict[str, float] | None = None,
    ) -> None:
        """settings: values of the model's that are not a sweep point but are worth a column (O-LoRA's lambda)."""
        params = {"model": ref.to_dict(), **self._eval_params()}
        step = self.plan.add(Step("eval", self.label_of(ref), params, ref_deps(ref)))
        columns = Point.of({**(settings or {}), **dict(self.point.values)}).values
        seed = self.seed if self.config.seeds is not None and method != "base" else None
        self.plan.evaluations.append(Evaluation(self.point.named(name), method, finetune, stage, step.key, trained_on,
                                                self.point.name, columns, seed))

    # --- methods -------------------------------------------------------------------------------
    def add_base(self) -> None:
        self.evaluate(self.base, "base", "base", "", None)

    def add_one_round(self, finetune: str) -> None:
        for task in self.tasks:
            name = f"one-round-{finetune}-{task['name']}"
            step = self.train_step(self.base, task, finetune)
            ref = ModelRef(step_ref(step)) if finetune == "fft" else ModelRef(self.base.model, step_ref(step))
            self.evaluate(ref, name, "one-round", finetune, None, task["name"])

    def add_sequential(self, finetune: str) -> None:
        current = self.base
        for stage, task in enumerate(self.tasks, start=1):
            name = f"sequential-{finetune}-{stage}"
            step = self.train_step(current, task, finetune)
            if finetune == "lora":
                step = self.merge_adapter_step(current, step)
            current = ModelRef(step_ref(step))
            self.evaluate(current, name, "sequential", finetune, stage, task["name"])

    def add_olora(self, lambdas: float | list[float]) -> None:
        """Sequential LoRA (each adapter merged before the next round) plus the orthogonality penalty
        against all earlier rounds' adapters. Round 1 has nothing to be orthogonal to, so it is
        sequential LoRA's round 1, shared."""
        tag = lambda_tag(lambdas)
        current, adapters = self.base, []
        for stage, (task, lam) in enumerate(zip(self.tasks, self._round_lambdas(lambdas), strict=True), start=1):
            olora = {"olora": {"lambda": lam, "previous": [step_ref(a) for a in adapters]}} if adapters else None
            step = self.train_step(current, task, "lora", extra=olora, label_suffix=f"olora{tag}" if olora else "",
                                   deps=tuple(a.key for a in adapters))
            adapters.append(step)
            current = ModelRef(step_ref(self.merge_adapter_step(current, step)))
            scalar = {} if isinstance(lambdas, list) else {"lambda": float(lambdas)}
            self.evaluate(current, f"olora-lora-{tag}-{stage}", "olora", "lora", stage, task["name"], scalar)

    def _round_lambdas(self, lambdas: float | list[float]) -> list[float]:
        if not isinstance(lambdas, list):
            return [float(lambdas)] * len(self.tasks)
        if len(lambdas) != len(self.tasks):
            index = self.config.methods.olora.lambdas.index(lambdas) if self.config.methods.olora else 0
            raise KnowstackError(f"a per-round list needs one lambda per round ({len(self.tasks)}), "
                                 f"not {len(lambdas)}", field=f"methods.olora.lambdas[{index}]")
        return [float(v) for v in lambdas]

    def add_joint(self, finetune: str, sampling: str) -> None:
        step = self.joint_train_step(self.base, finetune, sampling)
        ref = ModelRef(step_ref(step)) if finetune == "fft" else ModelRef(self.base.model, step_ref(step))
        trained_on = "+".join(task["name"] for task in self.tasks)
        self.evaluate(ref, f"joint-{finetune}", "joint", finetune, None, trained_on)

    def add_replay(self, finetune: str, fraction: float) -> None:
        """Sequential training where round t also trains on a sample of every earlier task. Round 1
        has no earlier task, so it is sequential training's round 1, shared."""
        current = self.base
        for stage, task in enumerate(self.tasks, start=1):
            earlier = self.tasks[: stage - 1]
            mixture = {"mixture": {"kind": "replay", "fraction": fraction, "earlier": earlier}} if earlier else None
            step = self.train_step(current, task, finetune, extra=mixture, label_suffix="replay" if earlier else "")
            if finetune == "lora":
                step = self.merge_adapter_step(current, step)
            current = ModelRef(step_ref(step))
            self.evaluate(current, f"replay-{finetune}-{stage}", "replay", finetune, stage, task["name"])

    def add_merge(self, finetune: str, method: str, merge: MergeConfig) -> None:
        """One model merged from the one-round models (FFT) or adapters (LoRA) of every task, with
        no data. The one-round train steps are the one-round method's own, so they run once."""
        trained = [self.train_step(self.base, task, finetune) for task in self.tasks]
        seed = self.seed if merge.seed is None else merge.seed
        settings = {"density": merge.density, "drop_rate": merge.drop_rate, "lambda": merge.lam, "seed": seed}
        params = {
            "method": method,
            "finetune": finetune,
            "base": self.base.to_dict(),
            "models": [step_ref(step) for step in trained],
            "options": {name: settings[name] for name in MERGE_METHOD_OPTIONS[method]},
        }
        if finetune == "lora" and merge.lora_space_of(method) != "delta":
            # only where it is set: the key of a delta-space merge stays what it was before factors existed
            params["options"]["lora_space"] = merge.lora_space_of(method)
        deps = ref_deps(self.base) + tuple(step.key for step in trained)
        label = f"{method}-{finetune}" + ("-factors" if "lora_space" in params["options"] else "")
        step = self.plan.add(Step("merge", label, params, deps))
        trained_on = "+".join(task["name"] for task in self.tasks)
        self.evaluate(ModelRef(step_ref(step)), f"merge-{method}-{finetune}", "merge", finetune, None, trained_on)

    def add_moe(self, experts: str, moe: MoeConfig) -> None:
        """One mixture of experts of the one-round models (FFT) or adapters (LoRA) of every task, or of
        `moe.tasks`, built with no data but a few prompts per expert. The one-round train steps are the
        one-round method's own, so they run once."""
        tasks = self._moe_tasks(moe, experts)
        n_experts = len(tasks) + (moe.base_expert == "routed")
        if moe.router != "none" and moe.top_k > n_experts:
            raise KnowstackError(f"top_k is {moe.top_k} but there are {n_experts} experts", field="methods.moe.top_k")
        if moe.router == "uniform" and moe.top_k < n_experts and moe.router_training is None:
            raise KnowstackError("a uniform router ties every expert, so top-k would always pick the first k: use "
                                 "top_k = the number of experts, router_training, or router: none",
                                 field="methods.moe.router")
        trained = [self.train_step(self.base, task, experts) for task in tasks]
        # what the mixture is made with; the sweep itself and an unset `attention` (an option added later) are
        # left out, so that the key of a mixture made before they existed stays its key
        options = moe.model_dump(mode="json", exclude={"experts", "tasks", "seed", "sweep", "points"})
        if options.get("attention") is None:
            options.pop("attention", None)
        if experts == "lora":
            options["shared"] = "base"  # an FFT-MoE option: a LoRA-MoE keeps the base's weights
        params = {
            "experts": experts,
            "base": self.base.to_dict(),
            "models": [step_ref(step) for step in trained],
            "tasks": tasks,
            "options": options,
            "seed": self.seed if moe.seed is None else moe.seed,
            "max_length": self.config.training.max_length,
        }
        deps = ref_deps(self.base) + tuple(step.key for step in trained)
        step = self.plan.add(Step("moe", f"{experts}-{moe.router}", params, deps))
        ref = ModelRef(step_ref(step)) if experts == "fft" else ModelRef(self.base.model, step_ref(step))
        self.evaluate(ref, f"moe-{experts}", "moe", experts, None, "+".join(task["name"] for task in tasks))

    def _moe_tasks(self, moe: MoeConfig, experts: str) -> list[dict]:
        listed = moe.tasks.get(experts) if isinstance(moe.tasks, dict) else moe.tasks
        if listed is None:
            return self.tasks
        known = {task["name"]: task for task in self.tasks}
        unknown = [name for name in listed if name not in known]
        if unknown:
            field = "methods.moe.tasks" + (f".{experts}" if isinstance(moe.tasks, dict) else "")
            raise KnowstackError(f"unknown task '{unknown[0]}' (the study's tasks: {', '.join(known)})", field=field)
        return [known[name] for name in listed]


def lambda_tag(lambdas: float | list[float]) -> str:
    """How an O-LoRA run is named: '0.5', or '0_0.5_5' for one lambda per round."""
    values = lambdas if isinstance(lambdas, list) else [lambdas]
    return "_".join(f"{float(v):g}" for v in values)


def training_params(training: TrainingConfig, finetune: str) -> dict[str, Any]:
    params = training.model_dump(mode="json")
    params.pop("report_to")  # where training is reported to does not change what it computes
    if finetune != "lora":
        params.pop("lora")
    return params


def built_world_fingerprint(world_dir: Path) -> str | None:
    """The fingerprint a built world's manifest records; None while it is not built."""
    manifest = world_dir / "world.json"
    return json.loads(manifest.read_text())["fingerprint"] if manifest.is_file() else None


def build_plan(config: StudyConfig, out: Path | None = None) -> Plan:
    """out: the study dir, where a built-in world already built gives its fingerprint to every later
    step's key (without it, or before the world is built, those keys are provisional: `world_pending`)."""
    builder = PlanBuilder(config, out)
    builder.add_base()
    methods = config.methods
    if all(getattr(methods, name) is None for name in type(methods).model_fields):
        raise KnowstackError("no methods to run", field="methods")
    for seed in config.seeds if config.seeds is not None else [config.seed]:
        builder.seed = seed
        add_methods(builder, config)
    return builder.plan


def add_methods(builder: PlanBuilder, config: StudyConfig) -> None:
    """Every method's models at the builder's seed."""
    methods = config.methods

    def points(name: str, finetune: str) -> list[Point]:
        return sweep_points(getattr(methods, name), finetune, own_settings(config, getattr(methods, name)))

    for finetune in methods.one_round.finetune if methods.one_round else []:
        for point in points("one_round", finetune):
            with builder.at(point, field_name="methods.one-round"):
                builder.add_one_round(finetune)
    for finetune in methods.sequential.finetune if methods.sequential else []:
        for point in points("sequential", finetune):
            with builder.at(point, field_name="methods.sequential"):
                builder.add_sequential(finetune)
    for point in points("olora", "lora") if methods.olora else []:
        for lambdas in methods.olora.lambdas:
            with builder.at(point, field_name="methods.olora"):
                builder.add_olora(lambdas)
    for finetune in methods.joint.finetune if methods.joint else []:
        for point in points("joint", finetune):
            with builder.at(point, field_name="methods.joint"):
                builder.add_joint(finetune, methods.joint.sampling)
    for finetune in methods.replay.finetune if methods.replay else []:
        for point in points("replay", finetune):
            with builder.at(point, field_name="methods.replay"):
                builder.add_replay(finetune, point.get("fraction", methods.replay.fraction))
    for finetune in methods.merge.finetune if methods.merge else []:
        for method in methods.merge.methods_for(finetune):
            # a point changing only what this merge method does not read would be the same model again
            seen: list[Point] = []
            for point in points("merge", finetune):
                point = Point.of({k: v for k, v in point.values if k in MERGE_METHOD_OPTIONS[method]})
                if point in seen:
                    continue
                seen.append(point)
                merge = methods.merge.model_copy(update={("lam" if k == "lambda" else k): v for k, v in point.values})
                with builder.at(point, field_name="methods.merge", trains=False):
                    builder.add_merge(finetune, method, merge)
    for experts in methods.moe.experts if methods.moe else []:
        for point in points("moe", experts):
            moe = methods.moe.model_copy(update={k: int(v) for k, v in point.values})
            with builder.at(point, field_name="methods.moe", trains=False):
                builder.add_moe(experts, moe)


def own_settings(config: StudyConfig, method: Sweepable) -> dict[str, float | None]:
    """The method's own value of every setting a sweep may change."""
    training = config.training
    own: dict[str, float | None] = {
        "lr": training.lr, "lr_of_pretrain_peak": training.lr_of_pretrain_peak, "epochs": training.epochs,
        "max_steps": training.max_steps, "rank": training.lora.r, "alpha": training.lora.alpha,
    }
    for name in ("fraction", "density", "drop_rate", "top_k"):
        if hasattr(method, name):
            own[name] = getattr(method, name)
    if isinstance(method, MergeConfig):
        own["lambda"] = method.lam
    return own


def sweep_points(method: Sweepable, finetune: str, own: dict[str, float | None]) -> list[Point]:
    """The method's own setting first, then each point of its sweep (the product of `sweep`'s values, then
    `points`) that differs from it, once. Settings a finetune has not (FFT has no rank) are dropped."""
    listed: list[dict[str, float]] = []
    if method.sweep:
        axes = {name: values.get(finetune, []) if isinstance(values, dict) else values
                for name, values in method.sweep.items()}
        axes = {name: values for name, values in axes.items() if values}
        listed += [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    listed += [dict(point) for point in method.points or []]
    found = [Point()]
    for settings in listed:
        changed = {name: value for name, value in settings.items()
                   if (finetune == "lora" or name not in LORA_ONLY_SWEEP) and own.get(name) != value}
        point = Point.of(changed)
        if point not in found:
            found.append(point)
    return found


def training_at(config: StudyConfig, point: Point, field_name: str) -> TrainingConfig:
    """The training section with a sweep point's training settings applied."""
    values = dict(point.values)
    update: dict[str, Any] = {}
    if "lr" in values and "lr_of_pretrain_peak" in values:
        raise KnowstackError("a point sets 'lr' or 'lr_of_pretrain_peak', not both", field=field_name)
    if "lr_of_pretrain_peak" in values and config.base.builtin is None:
        raise KnowstackError("'lr_of_pretrain_peak' needs 'base.builtin'; sweep 'lr'", field=field_name)
    if "lr" in values:
        update.update(lr=values["lr"], lr_of_pretrain_peak=None)
    if "lr_of_pretrain_peak" in values:
        update.update(lr=None, lr_of_pretrain_peak=values["lr_of_pretrain_peak"])
    if "epochs" in values:
        update["epochs"] = values["epochs"]
    if "max_steps" in values:
        update["max_steps"] = int(values["max_steps"])
    lora = {key: cast(values[name]) for name, key, cast in (("rank", "r", int), ("alpha", "alpha", float))
            if name in values}
    if lora:
        update["lora"] = config.training.lora.model_copy(update=lora)
    return config.training.model_copy(update=update)


def resolve_task_specs(config: StudyConfig, world_dir: Path | None) -> dict[str, TaskSpec]:
    """The concrete task files, once the world (if any) is built."""
    max_test = config.evaluation.max_test
    if config.builtin_tasks:
        from knowstack.data.tasks import builtin_tasks

        assert world_dir is not None
        manifest = json.loads((world_dir / "world.json").read_text())
        everything = {spec.name: spec for spec in builtin_tasks(world_dir, manifest, max_test=max_test)}
        specs = [everything[name] for name in config.builtin_task_names(list(everything))]
    else:
        specs = [task_from_config(cfg, max_test=max_test) for cfg in config.tasks]
    return {spec.name: spec for spec in specs}
