"""What each kind of step does: one small function per kind, reading its inputs' artifacts."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knowstack.atomic import atomic_dir, atomic_write_json
from knowstack.config import EvaluationConfig, OldKnowledgeConfig, StudyConfig
from knowstack.data.formats import Example
from knowstack.data.sampling import joint_mixture, replay_mixture
from knowstack.data.tasks import TaskSpec
from knowstack.errors import KnowstackError
from knowstack.logs import library_messages_to
from knowstack.study.plan import Step, resolve_task_specs
from knowstack.study.shared_cache import SharedCache, computed_once
from knowstack.usage import Usage, dir_bytes, torch_threads


@dataclass
class StudyContext:
    """What steps share: the study dir, the config, and the world once it is built."""

    out: Path
    config: StudyConfig
    world_key: str | None = None
    shared: SharedCache | None = None  # the shared step cache (study/shared_cache.py); None: off
    _tasks: dict[str, TaskSpec] | None = field(default=None, repr=False)

    @property
    def artifacts(self) -> Path:
        return self.out / "artifacts"

    def artifact(self, key: str) -> Path:
        return self.artifacts / key

    def resolve(self, ref: str | None) -> str | None:
        """'@<key>/<sub>' -> the path of a step's output; anything else is a path or hub id."""
        if ref is None or not ref.startswith("@"):
            return ref
        key, _, sub = ref[1:].partition("/")
        return str(self.artifact(key) / sub) if sub else str(self.artifact(key))

    @property
    def world_dir(self) -> Path | None:
        return self.artifact(self.world_key) if self.world_key else None

    def tasks(self) -> dict[str, TaskSpec]:
        if self._tasks is None:
            self._tasks = resolve_task_specs(self.config, self.world_dir)
        return self._tasks

    def world_manifest(self) -> dict[str, Any]:
        world = self.world_dir
        return json.loads((world / "world.json").read_text()) if world else {}

    def old_task_setup(self, old: OldKnowledgeConfig) -> tuple[list[str], Path | None]:
        if old.tasks == "builtin":
            manifest = self.world_manifest()
            return list(manifest["old_tasks"]), self.world_dir / manifest["old_include_path"]
        return list(old.tasks), old.include_path


# --- executors ------------------------------------------------------------------------------------
def run_world(step: Step, ctx: StudyContext, out: Path) -> None:
    from knowstack.builtin.world import build_world

    build_world(out, preset=step.params["preset"], seed=step.params["seed"])


def train_settings(ctx: StudyContext, params: dict[str, Any]):  # -> TrainSettings
    """A train step's run settings: its recipe (the step's `training`, as the plan hashed it) resolved."""
    from knowstack.config import TrainingConfig
    from knowstack.train import TrainSettings

    pretrain = ctx.world_manifest().get("pretrain") or {}
    return TrainSettings.from_config(TrainingConfig.model_validate(params["training"]), finetune=params["finetune"],
                                     seed=params["seed"], pretrain_peak=pretrain.get("peak_lr"))


MIXTURE_FILE = "mixture.json"
OLD_SETTINGS_FILE = "old-settings.json"  # beside an evaluation's old-knowledge scores: how lm-eval ran


def harness_settings(tokenizer: Any, add_bos_token: bool | None) -> dict[str, Any]:
    """What the old-knowledge scores depend on beyond the step's params: the harness's version and the BOS it
    put before every prompt (as set, or the tokenizer's default)."""
    from importlib.metadata import version

    from knowstack.evaluate.old_knowledge import harness_bos

    return {"lm_eval": version("lm_eval"), "add_bos_token": harness_bos(tokenizer, add_bos_token),
            "add_bos_token_setting": add_bos_token}


def run_train(step: Step, ctx: StudyContext, out: Path) -> None:
    """Here, or under `accelerate launch` when the config's launch section asks for processes: the
    same job either way (train/launch.py), so the artifact does not depend on how it was run."""
    from knowstack.train.launch import TrainJob, run_or_launch

    params = step.params
    examples, mixture = training_examples(ctx, params)
    job = TrainJob(
        model_path=ctx.resolve(params["init"]["model"]), out_dir=str(out),
        settings=train_settings(ctx, params).to_dict(), examples=[(ex.prompt, ex.answer) for ex in examples],
        progress_desc=step.label, olora=_olora_spec(ctx, params), ewc=_ewc_spec(ctx, params), lwf=params.get("lwf"),
        tracking=_tracking(step, ctx),
        tokenizer=params.get("tokenizer"), trust_remote_code=ctx.config.base.trust_remote_code,
    )
    run_or_launch(job, launch_spec(ctx, params, params["finetune"]))
    if mixture is not None:
        # What was replayed / mixed, index by index into each task's train split, beside the model.
        atomic_write_json(out / MIXTURE_FILE, mixture)


def launch_spec(ctx: StudyContext, params: dict[str, Any], finetune: str):  # -> LaunchSpec | None
    """How the config launches `finetune`'s training, with the mixed precision the step's key holds (the plan puts
    it in the params of the steps it launches: it changes the numbers, the process count does not)."""
    from dataclasses import replace

    from knowstack.train.launch import LaunchSpec

    spec = LaunchSpec.from_config(ctx.config.launch, finetune)
    return None if spec is None else replace(spec, mixed_precision=params.get("mixed_precision", "no"))


def _tracking(step: Step, ctx: StudyContext) -> dict[str, Any] | None:
    from knowstack.study.tracking import step_tracking

    tracking = step_tracking(step, ctx.config, ctx.out)
    return tracking.to_dict() if tracking else None


def training_examples(ctx: StudyContext, params: dict[str, Any]) -> tuple[list[Example], dict[str, Any] | None]:
    """A train step's examples: its task's train split, or a joint / replay mixture drawn from the seed."""
    specs = ctx.tasks()
    mixture = params.get("mixture")
    if mixture is None:
        return specs[params["task"]["name"]].load("train"), None
    if mixture["kind"] == "joint":
        tasks = [(task["name"], specs[task["name"]].load("train")) for task in params["tasks"]]
        return joint_mixture(tasks, mixture["sampling"], params["seed"])
    if mixture["kind"] == "replay":
        current = params["task"]["name"]
        earlier = [(task["name"], specs[task["name"]].load("train")) for task in mixture["earlier"]]
        return replay_mixture((current, specs[current].load("train")), earlier, mixture["fraction"], params["seed"])
    raise KnowstackError(f"unknown mixture kind '{mixture['kind']}'")


def _olora_spec(ctx: StudyContext, params: dict[str, Any]) -> dict[str, Any] | None:
    """O-LoRA's inputs as paths: the earlier rounds' adapter dirs and lambda."""
    if "olora" not in params:
        return None
    olora = params["olora"]
    return {"previous": [ctx.resolve(ref) for ref in olora["previous"]], "lambda": olora["lambda"]}


def _ewc_spec(ctx: StudyContext, params: dict[str, Any]) -> dict[str, Any] | None:
    """EWC's inputs: the earlier rounds' Fisher files (each statistics dir checked: its Fisher there and matching
    its recorded sha256), lambda and the decay."""
    if "ewc" not in params:
        return None
    from knowstack.combine.statistics import open_statistics

    ewc = params["ewc"]
    files = []
    for ref in ewc["fisher"]:
        statistics = open_statistics(ctx.resolve(ref), "fisher")
        files.append(str(statistics.path / statistics.record["statistics"]["fisher"]["file"]))
    return {"fisher": files, "lambda": ewc["lambda"], "decay": ewc["decay"]}


def run_merge_adapter(step: Step, ctx: StudyContext, out: Path) -> None:
    from knowstack.train import merge_adapter

    merge_adapter(ctx.resolve(step.params["init"]["model"]), ctx.resolve(step.params["adapter"]), out,
                  trust_remote_code=ctx.config.base.trust_remote_code)


PAD_BASE_FILE = "pad_base.json"  # beside a pad-base step's model: the pad token, its id, the rows before and after


def run_pad_base(step: Step, ctx: StudyContext, out: Path) -> None:
    """The study's base with the paper's `[PAD]` row (training.add_pad_token): every model is built from it."""
    from knowstack.atomic import atomic_write_json
    from knowstack.modelio import write_padded_base

    record = write_padded_base(ctx.resolve(step.params["model"]["model"]), out,
                               tokenizer_path=step.params.get("tokenizer"),
                               trust_remote_code=ctx.config.base.trust_remote_code)
    atomic_write_json(out / PAD_BASE_FILE, record)


def run_merge(step: Step, ctx: StudyContext, out: Path) -> None:
    """Models (or adapters) merged into one model, streamed to `out`: every task's one-round model (merge), or the
    running model and the next one (continual merging)."""
    from knowstack.combine.merge import merge_models
    from knowstack.combine.merges import MergeOptions

    params = step.params
    options = params["options"]
    merge_models(
        params["method"],
        [ctx.resolve(ref) for ref in params["models"]],
        out,
        base=_local_model_dir(ctx.resolve(params["base"]["model"])),
        options=MergeOptions.from_settings(options),  # the settings the method reads; the rest keep their defaults
        seed=options.get("seed", 0),
        weights=params.get("weights"),  # continual merging: the running model weighs as the models it holds
        statistics=[ctx.resolve(ref) for ref in params["statistics"]] if "statistics" in params else None,
    )


def run_statistics(step: Step, ctx: StudyContext, out: Path) -> None:
    """A one-round model's (FFT) or adapter's (LoRA) statistics of one kind (combine/statistics.py) on the first
    examples of its own task's training split, written to `out`."""
    from knowstack.combine.statistics import compute_statistics

    params = step.params
    base = _local_model_dir(ctx.resolve(params["base"]["model"]))
    compute_statistics(ctx.resolve(params["model"]), ctx.tasks()[params["task"]["name"]].load("train"), out,
                       base=base if params["finetune"] == "lora" else None, kinds=[params["kind"]],
                       max_examples=params["examples"], max_length=params["max_length"],
                       tokenizer=params.get("tokenizer") or base, trust_remote_code=ctx.config.base.trust_remote_code)


def run_moe(step: Step, ctx: StudyContext, out: Path) -> None:
    """The one-round models (or adapters) of the mixed tasks as the experts of one MoE, written to `out`.
    The few prompts per expert (router init, expert load) and the router-training set are the first
    examples of each task's training split (prompts: see _prompt_split). The method trains the routers, once the
    mixture is built (train/router_job.py RouterRun): launched as the config's launch section launches the training
    of the experts (its `lora` settings for a LoRA-MoE), in this process otherwise."""
    from knowstack.combine.moe import MoeOptions, mix_models
    from knowstack.train.router_job import RouterRun
    from knowstack.train.router_training import RouterTraining

    params, options = step.params, step.params["options"]
    specs = [ctx.tasks()[task["name"]] for task in params["tasks"]]
    prompts = [[ex.prompt for ex in spec.load(_prompt_split(spec, params))[: options["prompts_per_expert"]]]
               for spec in specs]
    training, examples = None, None
    if options["router_training"]:
        settings = options["router_training"]
        examples = [ex for spec in specs for ex in spec.load("train")[: settings["examples_per_task"]]]
        training = RouterTraining(steps=settings["steps"], lr=settings["lr"], batch_size=settings["batch_size"],
                                  aux_loss_coef=settings["aux_loss_coef"], max_length=params["max_length"],
                                  seed=params["seed"])
    layers = options["layers"]
    mix_models(
        _local_model_dir(ctx.resolve(params["base"]["model"])),
        [ctx.resolve(ref) for ref in params["models"]],
        out,
        options=MoeOptions(top_k=options["top_k"], layers=tuple(layers) if layers is not None else None,
                           shared=options["shared"], base_expert=options["base_expert"], router=options["router"],
                           seed=params["seed"], attention=tuple(options.get("attention") or ()),
                           routing=options.get("routing"), temperature=options.get("temperature") or 1.0,
                           **{name: options[name] for name in ("router_dtype", "router_init") if name in options}),
        prompts=prompts, tokenizer_path=params.get("tokenizer"),
        router_step=RouterRun(prompts, examples, training, params.get("tokenizer"),
                              launch_spec(ctx, params, params["experts"])),
    )


def run_gate(step: Step, ctx: StudyContext, out: Path) -> None:
    """A one-round adapter with the gates its contributor trains on its own task (PHATGOOSE): the adapter's
    files copied into `out`, then the gate vectors trained on the task's training split written beside them."""
    import shutil

    from knowstack.combine.inputs import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from knowstack.train.gate_training import GateTraining, gate_adapter

    params, settings = step.params, step.params["settings"]
    spec = ctx.tasks()[params["task"]["name"]]
    examples = spec.load("train")[: settings["examples_per_task"]]
    adapter = Path(ctx.resolve(params["adapter"]))
    out.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copyfile(adapter / name, out / name)
    gate_adapter(_local_model_dir(ctx.resolve(params["base"]["model"])), out, examples,
                 GateTraining(steps=settings["steps"], lr=settings["lr"], batch_size=settings["batch_size"],
                              max_length=params["max_length"], seed=params["seed"]),
                 tokenizer_path=params.get("tokenizer"))


def _prompt_split(spec: TaskSpec, params: dict[str, Any]) -> str:
    """Where an expert's router prompts come from: its task's training split; a registry compose's (prompts_from
    "eval") from the eval split where the task has one, since a contribution may not share its training data."""
    return "eval" if params.get("prompts_from") == "eval" and spec.eval_path is not None else "train"


def _local_model_dir(model: str) -> str:
    """A merge reads files tensor by tensor, so a hub id is first fetched to (or found in) the HF cache."""
    if Path(model).expanduser().is_dir():
        return model
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    return snapshot_download(model, allow_patterns=patterns)


def _max_new_tokens(evaluation: EvaluationConfig, task: TaskSpec) -> dict[str, int]:
    overrides = evaluation.max_new_tokens
    for key in (task.name, task.metric):
        if key in overrides:
            return {"max_new_tokens": overrides[key]}
    return {}


def _scoring_settings(evaluation: EvaluationConfig, task: TaskSpec, split: str = "test") -> dict[str, Any]:
    """The task's protocol (its own, else the study's) and, for math, the GSM8K files the harness reads. split
    "eval": the search's trials score the eval split, its items drawing their few-shot examples from each other."""
    from knowstack.evaluate.new_knowledge import HarnessData

    settings: dict[str, Any] = {"protocol": task.protocol or evaluation.protocol}
    if task.format == "math":
        settings["harness"] = (
            HarnessData(test=task.test_path, fewshot=task.eval_path, limit=task.max_test,
                        add_bos_token=evaluation.add_bos_token) if split == "test"
            else HarnessData(test=task.eval_path, fewshot=None, limit=task.max_test,
                             add_bos_token=evaluation.add_bos_token))
    return settings


def run_eval(step: Step, ctx: StudyContext, out: Path) -> None:
    """Scores one model on every new task and on old knowledge (`evaluate_model`), loaded alone."""
    from knowstack.modelio import load_model, load_tokenizer, on_gpu_if_it_fits

    ref = step.params["model"]
    model_path = ctx.resolve(ref["model"])
    trust = ctx.config.base.trust_remote_code
    model = load_model(model_path, ctx.resolve(ref["adapter"]), dtype="float32", trust_remote_code=trust)
    model = on_gpu_if_it_fits(model)
    tokenizer = load_tokenizer(step.params.get("tokenizer") or model_path, trust_remote_code=trust)
    evaluate_model(step, ctx, out, model, tokenizer)


def evaluate_model(step: Step, ctx: StudyContext, out: Path, model: Any, tokenizer: Any) -> None:
    """Scores the eval step's model, already loaded, on every new task and on old knowledge.

    Each task's scores are kept in a partial dir as soon as they exist, so a killed evaluation
    of a large model resumes at the next task instead of starting again.
    """
    from knowstack.evaluate.new_knowledge import evaluate_task
    from knowstack.evaluate.old_knowledge import evaluate_old_knowledge_items

    partial = ctx.artifacts / ".partial" / step.key
    partial.mkdir(parents=True, exist_ok=True)
    evaluation = EvaluationConfig.model_validate(step.params["evaluation"])
    old = OldKnowledgeConfig.model_validate(step.params["old"])
    for name, task in ctx.tasks().items():
        done = partial / f"new-{name}.json"
        if done.exists():
            continue
        score = evaluate_task(
            model, tokenizer, task.load("test"), task.metric, batch_size=evaluation.batch_size,
            **_max_new_tokens(evaluation, task), **_scoring_settings(evaluation, task),
        )
        _write_jsonl(partial / f"predictions-{name}.jsonl", score.predictions)
        atomic_write_json(done, {"task": name, **score.record(), "per_example": score.per_example})
    old_done = partial / "old.json"
    old_tasks, include_path = ctx.old_task_setup(old)
    if not old_tasks:  # no old knowledge to score (old_knowledge.tasks: [], e.g. a registry's contribution)
        atomic_write_json(partial / "old-per-example.json", {})
        atomic_write_json(old_done, {})
    if not old_done.exists():
        scores, items = evaluate_old_knowledge_items(
            model,
            tokenizer,
            old_tasks,
            include_path=include_path,
            batch_size=old.batch_size,
            limit=old.limit,
            num_fewshot=old.num_fewshot,
            add_bos_token=old.add_bos_token,
        )
        atomic_write_json(partial / "old-per-example.json", items)
        atomic_write_json(partial / OLD_SETTINGS_FILE, harness_settings(tokenizer, old.add_bos_token))
        atomic_write_json(old_done, scores)
    _write_per_example(partial)
    _log_scores(step, ctx, partial, out)
    for item in sorted(partial.iterdir()):
        shutil.copyfile(item, out / item.name)
    shutil.rmtree(partial)


def _log_scores(step: Step, ctx: StudyContext, partial: Path, out: Path) -> None:
    """The evaluation's scores to the study's trackers, as `new/<task>/<metric>` and `old/<task>/<metric>`."""
    if not ctx.config.training.report_to:
        return
    from knowstack.study.tracking import step_tracking
    from knowstack.train.tracking import log_scores

    scores = {}
    for done in sorted(partial.glob("new-*.json")):
        record = json.loads(done.read_text())
        scores.update({f"new/{record['task']}/{metric}": value for metric, value in record["scores"].items()
                       if isinstance(value, (int, float))})
    for task, values in json.loads((partial / "old.json").read_text()).items():
        if isinstance(values, dict):
            scores.update({f"old/{task}/{metric}": value for metric, value in values.items()
                           if isinstance(value, (int, float))})
    log_scores(step_tracking(step, ctx.config, ctx.out), out, scores)


PER_EXAMPLE_FILE = "per_example.json"
STEP_FILE = "step.json"  # every step's key, params and cost (seconds, peak memory, disk: knowstack.usage)


def _write_per_example(partial: Path) -> None:
    """Every item's score, {"new"|"old": {task: {metric: [score per test item, in test order]}}}: what the
    intervals of the study's numbers are bootstrapped from."""
    new = {}
    for path in sorted(partial.glob("new-*.json")):
        record = json.loads(path.read_text())
        new[record["task"]] = record["per_example"]
    old = json.loads((partial / "old-per-example.json").read_text())
    atomic_write_json(partial / PER_EXAMPLE_FILE, {"new": new, "old": old})


SEARCH_FILE = "search.json"  # a search step's record: its settings, every trial, the chosen one


def run_search(step: Step, ctx: StudyContext, out: Path) -> None:
    """A search of the composition within a forgetting budget (study/search.py): each trial merges the models
    at a point of the space and scores the merge on the tasks' eval splits and old knowledge's held-out slice
    (`held_out_scores`); the chosen trial's merge (the base where no trial is within the budget) is written to
    `out`, with search.json. Each trial's scores are kept as soon as they exist (a partial dir, as an evaluation's),
    so a killed search reruns only the trials it lacks."""
    import tempfile

    from knowstack.combine.merge import merge_models
    from knowstack.combine.merges import MergeOptions
    from knowstack.progress import step_bar
    from knowstack.study.search import SearchSpace, chosen_trial, search, search_record

    params = step.params
    partial = ctx.artifacts / ".partial" / step.key
    partial.mkdir(parents=True, exist_ok=True)
    cache_path = partial / "trials.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    base = _local_model_dir(ctx.resolve(params["base"]["model"]))
    models = [ctx.resolve(ref) for ref in params["models"]]
    space = SearchSpace(tuple(params["space"]["methods"]), len(models), tuple(params["space"]["lam_range"]),
                        tuple(params["space"]["density_range"]), tuple(params["space"]["weight_range"]))
    base_path = partial / "base.json"
    if not base_path.is_file():
        atomic_write_json(base_path, held_out_scores(ctx, params, base))
    base_old = json.loads(base_path.read_text())["old"]

    def merge_at(point: dict[str, Any], target: Path) -> None:
        method, options, weights = space.decode(point)
        merge_models(method, models, target, base=base, options=MergeOptions.from_settings(options),
                     seed=params["seed"], weights=weights)

    def evaluate(point: dict[str, Any]) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix=".search-", dir=partial) as tmp:
            merge_at(point, Path(tmp) / "model")
            return held_out_scores(ctx, params, str(Path(tmp) / "model"))

    bar = step_bar(range(params["trials"]), f"search-{params['finetune']}", unit="trial")

    def on_trial(trial: Any) -> None:
        atomic_write_json(cache_path, cache)  # each trial kept as soon as it is scored
        bar.set_postfix(eval=f"{trial.new:.3f}", old_loss=f"{trial.old_loss:.1f}%", within=trial.within)

    trials = search(space, params["trials"], params["seed"], params["max_old_loss"], base_old, evaluate, cache,
                    on_trial, numbers=bar)
    chosen = chosen_trial(trials)
    if chosen is None:  # nothing within the budget: the composition that forgets nothing is the base itself
        out.mkdir(parents=True)
        for item in Path(base).iterdir():
            if item.is_file() and item.name != STEP_FILE:  # not copy2: the output's mode is the umask's
                shutil.copyfile(item, out / item.name)
    else:
        merge_at(chosen.point, out)
    record = search_record(trials, space, params["max_old_loss"], base_old, params["seed"])
    atomic_write_json(out / SEARCH_FILE, {**record, "base_scores": json.loads(base_path.read_text())})
    shutil.rmtree(partial)


def old_task_items(include_path: Path | None, task: str) -> int | None:
    """The items of an old-knowledge task whose data lies beside its YAML as TASK.jsonl (the built-in world's, and
    a registry's stored include dir: registry/compose_plan.py checks a search's slice with it); None where it does
    not, for the user to size."""
    data = include_path / f"{task}.jsonl" if include_path is not None else None
    if data is None or not data.is_file():
        return None
    with data.open(encoding="utf-8") as lines:
        return sum(1 for _ in lines)


def held_out_slice(ctx: StudyContext, old: OldKnowledgeConfig, items: int) -> dict[str, list[int]]:
    """The old-knowledge items a search scores its trials on: of each task, the `items` after the first
    old_knowledge.limit ones (those the test scoring reads), as many as the task has (the built-in world's
    tasks are counted; another task's items past its end are the user's to size)."""
    from knowstack.errors import KnowstackError

    if old.limit is None:
        raise KnowstackError("the search scores old knowledge on items the test scoring never reads: set "
                             "old_knowledge.limit (the test scoring reads the first `limit` items of each task; the "
                             "search the next `old_items`)", field="old_knowledge.limit")
    tasks, include_path = ctx.old_task_setup(old)
    found = {}
    for task in tasks:
        counted = old_task_items(include_path, task)
        available = old.limit + items if counted is None else counted
        found[task] = list(range(old.limit, min(available, old.limit + items)))
        if not found[task]:
            raise KnowstackError(f"old-knowledge task '{task}' has {available} items, none after the first "
                                 f"{old.limit} the test scoring reads: lower old_knowledge.limit",
                                 field="old_knowledge.limit")
    return found


def held_out_scores(ctx: StudyContext, params: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """A model's scores where a search may look: each task's eval split (never test; the mean of each task's
    first score is the objective, "new") and old knowledge's held-out slice (the AVE of the study's old metric,
    "old")."""
    from knowstack.config import old_metric_of
    from knowstack.errors import KnowstackError
    from knowstack.evaluate.new_knowledge import evaluate_task
    from knowstack.evaluate.old_knowledge import evaluate_old_knowledge_items
    from knowstack.modelio import load_model, load_tokenizer, on_gpu_if_it_fits

    trust = ctx.config.base.trust_remote_code
    model = on_gpu_if_it_fits(load_model(model_dir, None, dtype="float32", trust_remote_code=trust))
    tokenizer = load_tokenizer(params.get("tokenizer") or model_dir, trust_remote_code=trust)
    evaluation = EvaluationConfig.model_validate(params["evaluation"])
    old = OldKnowledgeConfig.model_validate(params["old"])
    new: dict[str, float] = {}
    # a task without an eval split (the built-in world's math: MetaMathQA train, GSM8K test) is left out of the
    # objective, and said so in the record: the search never falls back to test
    unscored = [name for name, task in ctx.tasks().items() if task.eval_path is None]
    if len(unscored) == len(ctx.tasks()):
        raise KnowstackError("no task has an eval split: the search scores its trials on eval splits, never on test",
                             field="methods.search")
    for name, task in ctx.tasks().items():
        if task.eval_path is None:
            continue
        score = evaluate_task(model, tokenizer, task.load("eval"), task.metric, batch_size=evaluation.batch_size,
                              **_max_new_tokens(evaluation, task), **_scoring_settings(evaluation, task, "eval"))
        new[name] = float(next(iter(score.scores.values())))
    tasks, include_path = ctx.old_task_setup(old)
    scores, _ = evaluate_old_knowledge_items(model, tokenizer, tasks, include_path=include_path,
                                             batch_size=old.batch_size, num_fewshot=old.num_fewshot,
                                             add_bos_token=old.add_bos_token,
                                             samples=held_out_slice(ctx, old, params["old_items"]))
    olds = {task: float(values[old_metric_of(old.metric, task)]) for task, values in scores.items()}
    return {"new": sum(new.values()) / len(new), "old": sum(olds.values()) / len(olds),
            "scores": {"eval": new, "old_held_out": olds, **({"no_eval_split": unscored} if unscored else {})}}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from knowstack.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


EXECUTORS: dict[str, Callable[[Step, StudyContext, Path], None]] = {
    "world": run_world,
    "train": run_train,
    "merge-adapter": run_merge_adapter,
    "pad-base": run_pad_base,
    "eval": run_eval,
    "merge": run_merge,
    "moe": run_moe,
    "statistics": run_statistics,
    "gate": run_gate,
    "search": run_search,
}


def step_log(ctx: StudyContext, step: Step) -> Path:
    """Where a step's library warnings go (knowstack.logs): beside the artifacts, kept across attempts."""
    return ctx.out / "logs" / f"{step.key}.log"


def execute(step: Step, ctx: StudyContext,
            executor: Callable[[Step, StudyContext, Path], None] | None = None) -> Path:
    """Run a step into a temporary dir that becomes its artifact only when it completes. executor: what computes
    it, where not its kind's (EXECUTORS): an evaluation on a base loaded once for several (evaluate_on_one_base)."""
    final = ctx.artifact(step.key)
    if final.exists():
        return final
    try:
        executor = executor or EXECUTORS[step.kind]
    except KeyError:
        raise KnowstackError(f"unknown step kind '{step.kind}'") from None
    with computed_once(ctx.shared, step.key, final, ctx.artifacts) as reused:
        if reused:
            return final
        with atomic_dir(final) as tmp:
            # Executors that write atomically themselves get a path that does not exist yet.
            target = tmp / "out"
            with library_messages_to(step_log(ctx, step)), Usage() as usage:
                executor(step, ctx, target if step.kind in ("world", "train", "merge-adapter", "merge", "moe",
                                                             "statistics", "search", "pad-base") else tmp)
            if target.exists():
                for item in target.iterdir():
                    item.rename(tmp / item.name)
                target.rmdir()
            # What the step cost, in this process (a launched training's own peaks are in its train_summary.json):
            # in step.json, which is the step's record, not part of the model it made (a registry leaves it out).
            # The torch thread count too: on some models a step's sums, so its numbers, depend on it (docs/config.md).
            cost = {**usage.record(), "disk_bytes": dir_bytes(tmp), "torch_threads": torch_threads()}
            atomic_write_json(tmp / STEP_FILE, {"key": step.key, "kind": step.kind, "params": step.params, "cost": cost})
    return final


# --- evaluations of several adapters on one loaded base ---------------------------------------------------------
def base_group_key(step: Step) -> tuple[str, str | None] | None:
    """What eval steps must share to be run on one loaded base: the base model and the tokenizer; None for a step
    that is not an evaluation of an adapter (or of the base itself)."""
    if step.kind != "eval":
        return None
    return step.params["model"]["model"], step.params.get("tokenizer")


def shares_base(step: Step, ctx: StudyContext) -> bool:
    """Whether the step's model is its base alone or with a plain LoRA adapter that can be merged in and taken out
    again (not a LoRA-MoE, no modules_to_save: those replace modules of the base)."""
    adapter = ctx.resolve(step.params["model"]["adapter"])
    if adapter is None:
        return True
    config = Path(adapter) / "adapter_config.json"
    if (Path(adapter) / "lora_moe.json").exists() or not config.is_file():
        return False
    settings = json.loads(config.read_text())
    return settings.get("peft_type") == "LORA" and not settings.get("modules_to_save")


def evaluate_on_one_base(steps: list[Step], ctx: StudyContext, started: Callable[[Step], None],
                         finished: Callable[[Step], None]) -> int:
    """Evaluation steps of one base (base_group_key), each on the base loaded once with its adapter merged in as
    loading would merge it, then taken out (the base's weights copied back): each step's artifact is written and
    done on its own, byte for byte as run_eval writes it alone. Returns how many steps ran."""
    from knowstack.modelio import load_model, load_tokenizer, on_gpu_if_it_fits

    first = steps[0].params
    model_path = ctx.resolve(first["model"]["model"])
    trust = ctx.config.base.trust_remote_code

    @functools.cache
    def base_and_tokenizer() -> tuple[Any, Any]:
        # Loaded at the first step the shared cache does not supply: when it supplies all, never.
        return (on_gpu_if_it_fits(load_model(model_path, None, dtype="float32", trust_remote_code=trust)),
                load_tokenizer(first.get("tokenizer") or model_path, trust_remote_code=trust))

    def evaluate_with_adapter(step: Step, ctx: StudyContext, out: Path) -> None:
        base, tokenizer = base_and_tokenizer()
        with adapter_merged(base, ctx.resolve(step.params["model"]["adapter"])) as model:
            evaluate_model(step, ctx, out, model, tokenizer)

    for step in steps:
        started(step)
        execute(step, ctx, evaluate_with_adapter)
        finished(step)
    return len(steps)


@contextlib.contextmanager
def adapter_merged(base: Any, adapter: str | None) -> Iterator[Any]:
    """The base with the LoRA adapter merged into its weights (as modelio.load_model merges it: the same sums on
    the same weights), and afterwards the base again, its targeted weights copied back bit for bit."""
    if adapter is None:
        yield base
        return
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    wrapped = PeftModel.from_pretrained(base, adapter)
    layers = [module.get_base_layer() for module in wrapped.modules() if isinstance(module, LoraLayer)]
    saved = [(tensor, tensor.detach().to("cpu", copy=True)) for layer in layers
             for tensor in (layer.weight, getattr(layer, "bias", None)) if tensor is not None]
    model = wrapped.merge_and_unload()
    model.eval()
    try:
        yield model
    finally:
        with torch.no_grad():
            for tensor, original in saved:
                tensor.copy_(original)
