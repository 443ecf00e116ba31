"""What the catalog's methods (study/methods/) plan a study's graph of steps (study/graph.py) with.

PlanBuilder holds what every method plans with: the base, the tasks, the training recipe at the current sweep
point and seed, and the steps every method shares (train, merge an adapter in, evaluate). A registry compose
builds on the same builder, with the contributions standing in for the one-round models.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from knowstack.config import (
    LORA_ONLY_SWEEP,
    OWN_SWEEP,
    MergeConfig,
    StudyConfig,
    Sweepable,
    TrainingConfig,
)
from knowstack.data.tasks import TaskSpec, task_from_config
from knowstack.errors import KnowstackError
from knowstack.study.graph import (
    Evaluation,
    ModelRef,
    Plan,
    Point,
    Step,
    ref_deps,
    step_ref,
)

# The kinds of step that tokenize text with the base's tokenizer (pad-base: its length sizes the grown base).
TOKENIZING_STEPS = frozenset({"train", "eval", "statistics", "moe", "gate", "search", "pad-base"})
# The steps whose model is the study's base, for what a model is called ('base')
BASE_STEPS = frozenset({"world", "pad-base"})


class PlanBuilder:
    """What the catalog's methods plan with (study/methods/): the base, the tasks, the recipe, the shared steps.

    A registry compose sets what a study has no need of: `provided` (task name -> the contributed model or adapter
    that stands in for the one-round model), `start` (the model training begins from, when not the base),
    `merge_with` (models merged in before the one-round ones), `replayed` (tasks replayed from before round 1) and
    `router_prompts_from` ("eval": a MoE's router prompts from each task's eval split where it has one)."""

    def __init__(self, config: StudyConfig, out: Path | None = None, world_dir: Path | None = None):
        self.config = config
        self.out = out
        self.world_dir = world_dir  # a built world of this key elsewhere (the shared cache's), where `out` has none
        self.plan = Plan(config)
        self.world: Step | None = None
        self.point = Point()
        self.seed = config.seed  # the training seed of the models added now (the world's is config.seed)
        self.training = config.training
        # the base as it is (the `base` row scores it) and, with training.add_pad_token, the base every model is
        # built from: grown by the paper's pad token (a pad-base step)
        self.original_base = self._base_model()
        self.base = self._padded(self.original_base) if config.training.add_pad_token else self.original_base
        self.tasks = self._tasks()
        self.plan.task_names = [task["name"] for task in self.tasks]
        self.budgets = {} if config.builtin_tasks else {cfg.name: cfg.budget() for cfg in config.tasks}
        self.start = self.base
        self.provided: dict[str, str] = {}
        self.provided_statistics: dict[str, str] = {}  # task name -> the statistics dir its contributor gave
        self.merge_with: list[str] = []
        self.replayed: list[dict] = []
        self.router_prompts_from: str | None = None

    # --- the base and the tasks -------------------------------------------------------------
    def _base_model(self) -> ModelRef:
        base = self.config.base
        if base.builtin is not None:
            from knowstack.builtin.world import WORLD_VERSION

            self.world = self.plan.add(
                Step("world", base.builtin, {"preset": base.builtin, "seed": self.config.seed, "version": WORLD_VERSION})
            )
            fingerprint = built_world_fingerprint(self.out / "artifacts" / self.world.key) if self.out else None
            if fingerprint is None and self.world_dir is not None:
                fingerprint = built_world_fingerprint(self.world_dir)
            self.plan.world_fingerprint, self.plan.world_pending = fingerprint, fingerprint is None
            return ModelRef(step_ref(self.world, "model"), world=fingerprint or "pending")
        return ModelRef(base.model)

    def _padded(self, base: ModelRef) -> ModelRef:
        """The base with the paper's `[PAD]` row (modelio.add_pad_token), as the paper's training and merge scripts
        load it: what every model of the study starts from, so that merges and MoEs mix models of one shape and a
        task vector's pad row is measured from where training started."""
        step = self.add_step("pad-base", "base", {"model": base.to_dict()}, ref_deps(base))
        return ModelRef(step_ref(step))

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

    def eval_params(self) -> dict[str, Any]:
        """What an evaluation computes with beyond its model: the tasks, old knowledge's and the evaluation's
        settings, and the tasks' own protocols (a search's trials are scored with the same)."""
        cfg = self.config
        params = {
            "tasks": self.tasks,
            "old": dumped_for_key(cfg.old_knowledge),
            "evaluation": dumped_for_key(cfg.evaluation),
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
        return "base" if step.kind in BASE_STEPS else step.label

    def train_step(
        self,
        init: ModelRef,
        task: dict,
        finetune: str,
        *,
        extra: dict[str, Any] | None = None,
        label_suffix: str = "",
        deps: tuple[str, ...] = (),
        title: str = "",
    ) -> Step:
        """extra: what makes a variant differ from plain training on `task` (a replay mixture, an
        O-LoRA penalty); without it the step, and so its key, is exactly plain training's. title: the round it is,
        shown on the console only (Step.title)."""
        label = f"{finetune}-{task['name']}" + (f"-{label_suffix}" if label_suffix else "")
        params = {
            "init": init.to_dict(),
            "task": task,
            "finetune": finetune,
            "training": training_params(self._training_for(task), finetune),
            "seed": self.seed,
            **(extra or {}),
        }
        return self.add_step("train", label, params, ref_deps(init) + deps, title)

    def _training_for(self, task: dict) -> TrainingConfig:
        """The recipe with the task's own budget (epochs or max_steps), unless the sweep point sets one: a task
        without a budget trains, and so hashes, exactly as before budgets existed."""
        budget = dict(self.budgets.get(task["name"], {}))
        if self.point.get("epochs") is not None or self.point.get("max_steps") is not None:
            budget = {name: value for name, value in budget.items() if name not in ("epochs", "max_steps")}
        return self.training.model_copy(update=budget) if budget else self.training

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
        return self.add_step("train", f"{finetune}-joint-{sampling}", params, ref_deps(init))

    def merge_adapter_step(self, init: ModelRef, adapter: str, deps: tuple[str, ...], label: str,
                           title: str = "") -> Step:
        """`init` with the adapter `adapter` (a step's ref, or a path) folded into its weights."""
        params = {"init": init.to_dict(), "adapter": adapter}
        return self.plan.add(Step("merge-adapter", label, params, ref_deps(init) + deps, title))

    def statistics_step(self, kind: str, finetune: str, model: str, task: dict, examples: int,
                        deps: tuple[str, ...], base: ModelRef | None = None) -> Step:
        """The `kind` statistics (combine/statistics.py) of `model` (a model's ref, or a LoRA adapter's on `base`,
        by default the study's base) on the first `examples` of `task`'s training split. deps: the keys of the steps
        that make `model`."""
        base = base or self.base
        params = {"kind": kind, "finetune": finetune, "model": model, "base": base.to_dict(), "task": task,
                  "examples": examples, "max_length": self.training.max_length}
        return self.add_step("statistics", f"{kind}-{finetune}-{task['name']}", params, ref_deps(base) + deps)

    def round_title(self, method: str, stage: int) -> str:
        """'sequential round 2/7': which round of a method a step is, for the console."""
        return f"{method} round {stage}/{len(self.tasks)}"

    def add_step(self, kind: str, label: str, params: dict[str, Any], deps: tuple[str, ...], title: str = "") -> Step:
        """title: which round of a method the step is, shown on the console only (Step.title)."""
        return self.plan.add(Step(kind, label, {**params, **self._read_from_config(kind, params)}, deps, title))

    def _read_from_config(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        """What a step of `kind` reads of the config beyond the settings its method gives it, so that it is in the
        step's key (a step computes from its params only): the base's own tokenizer, and the mixed precision of
        training launched as processes. Each only when set, so that a study without them keeps its keys."""
        extra: dict[str, Any] = {}
        if self.config.base.tokenizer is not None and kind in TOKENIZING_STEPS and self._reads_base_tokenizer(params):
            extra["tokenizer"] = self.config.base.tokenizer
        trains = {"train": params.get("finetune"), "moe": params.get("experts")}.get(kind)
        if trains is not None and (kind == "train" or params["options"].get("router_training")):
            from knowstack.train.launch import launched_mixed_precision

            launch = self.config.launch.for_finetune(trains)
            precision = launched_mixed_precision(launch)
            if precision is not None:
                extra["mixed_precision"] = precision
        return extra

    def _reads_base_tokenizer(self, params: dict[str, Any]) -> bool:
        """Whether a step tokenizes with base.tokenizer: all do, but with training.add_pad_token only those of the
        base as it is (pad-base, the `base` row); a model built from the grown base reads the tokenizer with
        `[PAD]` that lies beside it, as the paper's scripts do."""
        return not self.training.add_pad_token or params.get("model") == self.original_base.to_dict()

    def base_deps(self) -> tuple[str, ...]:
        return ref_deps(self.base)

    def one_round_input(self, task: dict, finetune: str) -> tuple[str, tuple[str, ...]]:
        """What a merge or MoE combines for `task`: its one-round model (FFT) or adapter (LoRA), as a ref and the
        keys of the steps it needs: the one-round method's own train step, or what a contributor provided."""
        if task["name"] in self.provided:
            return self.provided[task["name"]], ()
        step = self.train_step(self.base, task, finetune)
        return step_ref(step), (step.key,)

    def each_point(self, section: Any, field_name: str) -> Iterator[tuple[str, Point]]:
        """(finetune, sweep point) for every finetune the section names and every point of its sweep, each inside
        `at(point)`: the loop of every trained method's plan."""
        for finetune in section.finetune:
            for point in self.points_of(section, finetune):
                with self.at(point, field_name=field_name):
                    yield finetune, point

    def points_of(self, section: Sweepable, finetune: str) -> list[Point]:
        """The method's own setting first, then each point of its sweep."""
        return sweep_points(section, finetune, own_settings(self.config, section))

    def evaluate(
        self, ref: ModelRef, name: str, method: str, finetune: str, stage: int | None, trained_on: str = "",
        settings: dict[str, float] | None = None,
    ) -> None:
        """settings: values of the model's that are not a sweep point but are worth a column (O-LoRA's lambda)."""
        params = {"model": ref.to_dict(), **self.eval_params()}
        step = self.add_step("eval", self.label_of(ref), params, ref_deps(ref))
        columns = Point.of({**(settings or {}), **dict(self.point.values)}).values
        seed = self.seed if self.config.seeds is not None and method != "base" else None
        self.plan.evaluations.append(Evaluation(self.point.named(name), method, finetune, stage, step.key, trained_on,
                                                self.point.name, columns, seed))

    def add_base(self) -> None:
        self.evaluate(self.original_base, "base", "base", "", None)


# Settings added after studies were run: in a step's params only when set to other than their default, so that
# the key of a step made before they existed stays its key.
LATER_SETTINGS = ("precision", "loss_reduction", "add_bos_token", "overlong", "add_pad_token")


def dumped_for_key(section: BaseModel) -> dict[str, Any]:
    """A config section as a step's params hold it: its fields, less those of LATER_SETTINGS at their default."""
    defaults = type(section).model_fields
    return {name: value for name, value in section.model_dump(mode="json").items()
            if name not in LATER_SETTINGS or getattr(section, name) != defaults[name].default}


def training_params(training: TrainingConfig, finetune: str) -> dict[str, Any]:
    params = dumped_for_key(training)
    params.pop("report_to")  # where training is reported to does not change what it computes
    if finetune != "lora":
        params.pop("lora")
    return params


def built_world_fingerprint(world_dir: Path) -> str | None:
    """The fingerprint a built world's manifest records; None while it is not built."""
    manifest = world_dir / "world.json"
    return json.loads(manifest.read_text())["fingerprint"] if manifest.is_file() else None


def own_settings(config: StudyConfig, method: Sweepable) -> dict[str, float | None]:
    """The method's own value of every setting a sweep may change."""
    training = config.training
    own: dict[str, float | None] = {
        "lr": training.lr, "lr_of_pretrain_peak": training.lr_of_pretrain_peak, "epochs": training.epochs,
        "max_steps": training.max_steps, "rank": training.lora.r, "alpha": training.lora.alpha,
    }
    for name in OWN_SWEEP:
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
