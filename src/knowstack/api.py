"""knowstack's Python API: what the CLI does, for notebooks and scripts (docs/api.md).

    import knowstack as ks
    merged = ks.merge("ties", ["a1", "a2", "a3"], "out/merged", base="base-model")
    ks.score(merged, "data/Stance")                      # TaskScores(task='Stance', n=..., scores={...})
    study = ks.run_study("configs/builtin-quick.yaml", "runs/quick")
    study.dataframe()                                    # pandas, if installed; study.rows always

Every function calls the same code the matching CLI command calls (train/loop, combine/merge, combine/moe,
evaluate/*, study/runner, registry/*), so results are the same either way. Bad input raises
knowstack.errors.KnowstackError naming the file, field and item. Heavy libraries (torch, transformers) are
imported only by the functions that need them. The functions that run the libraries (@quiet_call) are as quiet
as the CLI: no library progress bars, and the libraries' warnings to the program's logging (logs.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowstack.config import DEFAULT_PROTOCOL, EVAL_BATCH_SIZE
from knowstack.errors import KnowstackError
from knowstack.logs import KnowstackDeprecation, quiet_call

if TYPE_CHECKING:
    import pandas

    from knowstack.config import StudyConfig, TrainingConfig
    from knowstack.data.tasks import TaskSpec
    from knowstack.registry.core import Registry
    from knowstack.results import Cost, Row
    from knowstack.study.plan import Plan

PathLike = str | Path

__all__ = [
    "PlannedStep", "StudyResults", "TaskScores", "build_world", "compose", "contribute", "dry_run", "evaluate", "export",
    "extract_lora",
    "history", "init_registry", "load_study", "merge", "mix", "open_registry", "rows_frame", "run_study", "score",
    "score_predictions", "study_results", "train", "statistics", "gate",
]


# --- the built-in world -------------------------------------------------------------------------------
@quiet_call
def build_world(out: PathLike, *, preset: str = "quick", seed: int = 0) -> Path:
    """The built-in world, as `knowstack build-world`: a tiny pretrained base (out/model), its new-knowledge tasks in
    TRACE layout (out/tasks/<Task>), its lm-eval old-knowledge tasks (out/old_knowledge) and world.json; preset
    test (seconds, for trying things), quick or full (builtin/world.py PRESETS). Returns `out`."""
    from knowstack.builtin.world import build_world as build

    return build(Path(out), preset=preset, seed=seed)


# --- studies -------------------------------------------------------------------------------------------
def _renamed(new: Any, old: Any, new_name: str, old_name: str, default: Any) -> Any:
    """An argument given by its new name or, deprecated (a warning), by its old one; the same value either way."""
    if old is None:
        return default if new is None else new
    import warnings

    # the caller's line: past this function, the API function and its quiet_call wrapper
    warnings.warn(f"{old_name}= is deprecated: write {new_name}=", KnowstackDeprecation, stacklevel=4)
    if new is not None and new != old:
        raise KnowstackError(f"{new_name}={new!r} and its old name {old_name}={old!r} disagree: give one",
                             field=new_name)
    return old


def load_study(config: PathLike | Mapping[str, Any] | StudyConfig) -> StudyConfig:
    """A validated study config from a YAML file, a mapping (relative paths resolved against the current
    directory) or an existing StudyConfig."""
    from knowstack.config import StudyConfig, load_config, parse_config

    if isinstance(config, StudyConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(dict(config), root=Path.cwd())
    return load_config(config)


@dataclass(frozen=True)
class PlannedStep:
    """One step of a study's plan, as the dry run shows it; estimate: study/resources.py's (None if unknown)."""

    index: int
    key: str
    kind: str
    label: str
    done: bool
    estimate: Any = None
    in_shared_cache: bool = False  # a run links it from the shared step cache rather than computing it


def dry_run(config: PathLike | Mapping[str, Any] | StudyConfig, out: PathLike, gpu_memory_gib: float = 80.0, *,
            console: Any = None, shared_cache: bool | None = None) -> list[PlannedStep]:
    """The plan of a study in `out`: every step, whether it is done or a run would link it from the shared step cache
    (shared_cache: as `run_study`'s), and its memory estimate; runs nothing. Every input the study reads is checked
    first. console: a rich Console to also print the plan and the estimates table to, as `knowstack study CONFIG
    --out OUT --dry-run` does (gpu_memory_gib: GiB per GPU)."""
    from knowstack.study.resources import GiB, estimate_plan
    from knowstack.study.runner import dry_plan
    from knowstack.study.runner import run_study as run
    from knowstack.validate import check_study, raise_problems

    study = load_study(config)
    if console is None:
        raise_problems(check_study(study, dry_run=True))
    else:  # the runner's dry run checks the same inputs, then prints
        run(study, Path(out), dry_run=True, console=console, gpu_memory=int(gpu_memory_gib * GiB),
            shared_cache=shared_cache)
    dry = dry_plan(study, Path(out), shared_cache)
    estimates = dict((step.key, est) for step, est in estimate_plan(dry.plan, int(gpu_memory_gib * GiB))[0])
    return [PlannedStep(i, s.key, s.kind, s.label, s.key in dry.done, estimates.get(s.key), s.key in dry.cached)
            for i, s in enumerate(dry.plan.ordered(), start=1)]


@dataclass
class StudyResults:
    """A study dir's results: one Row per (model, task, metric) (results.py), its results.csv and report;
    plan: the study's plan (study/plan.py: its config, tasks and steps)."""

    out: Path
    plan: Plan = field(repr=False)
    rows: list[Row] = field(default_factory=list)

    @property
    def results_csv(self) -> Path:
        return self.out / "results.csv"

    @property
    def report(self) -> Path:
        return self.out / "report.html"

    def records(self) -> list[dict[str, object]]:
        """The rows as dicts with results.csv's columns."""
        return [row.record() for row in self.rows]

    def dataframe(self) -> pandas.DataFrame:
        return rows_frame(self.rows)

    @property
    def costs(self) -> list[Cost]:
        """What each model cost along its lineage (costs.csv: steps, seconds, examples, peak memory, disk); [] for a
        study run before costs were recorded."""
        from knowstack.results import COSTS_CSV, read_costs_csv

        return read_costs_csv(self.out / COSTS_CSV)

    def write_report(self) -> Path:
        """Write the study's report from these rows (report.html, report.md, figures/, tables/), as `knowstack
        report` does; returns report.html."""
        from knowstack.report.build import write_study_report
        from knowstack.study.results import current_costs, current_items, study_info

        return write_study_report(self.out, self.rows, study_info(self.plan, self.out / "artifacts"),
                                  items=current_items(self.plan, self.out), costs=current_costs(self.plan, self.out))


def rows_frame(rows: Sequence[Row]) -> pandas.DataFrame:
    """Rows as a pandas DataFrame (results.csv's columns); pandas is optional: pip install pandas."""
    try:
        import pandas
    except ImportError:
        raise KnowstackError("a DataFrame needs pandas: pip install pandas (or use .rows / .records())") from None
    return pandas.DataFrame([row.record() for row in rows])


@quiet_call
def run_study(config: PathLike | Mapping[str, Any] | StudyConfig, out: PathLike, *, executor: str = "local",
              address: str | None = None, console: Any = None, jobs: int | None = None,
              threads: int | str | None = None, shared_cache: bool | None = None) -> StudyResults:
    """Run (or resume) a study into `out`, as `knowstack study CONFIG --out OUT` does; returns its results.
    console: a rich Console for progress (default: stderr); jobs: the local executor's steps at once (default:
    the config's executor.jobs); threads: the torch threads of a step beside others (share, all or a number; default:
    the config's executor.threads); shared_cache: False computes every step in `out`, taking nothing from the
    machine's shared step cache and giving it nothing (default: the config's executor.shared_cache, on)."""
    from knowstack.study.executors import make_executor
    from knowstack.study.runner import run_study as run

    study = load_study(config)  # first: a config file that is not there is one clear error
    text = Path(config).read_text(encoding="utf-8") if isinstance(config, (str, Path)) else None
    executor_ = make_executor(executor, address, jobs, threads)
    outcome = run(study, Path(out), console=console, config_text=text, executor=executor_, shared_cache=shared_cache)
    results = study_results(out, study)
    if outcome is not None:
        results.write_report()
    return results


def study_results(out: PathLike, config: PathLike | Mapping[str, Any] | StudyConfig | None = None) -> StudyResults:
    """The results of a study dir so far (a running study: the evaluations finished); config defaults to the
    dir's config.yaml."""
    from knowstack.study.plan import build_plan
    from knowstack.study.results import current_rows

    out = Path(out)
    if config is None:
        if not (out / "config.yaml").is_file():
            raise KnowstackError("not a study dir (no config.yaml): pass the config too", path=out)
        config = out / "config.yaml"
    plan = build_plan(load_study(config), out)
    return StudyResults(out, plan, current_rows(plan, out))


# --- one model at a time ---------------------------------------------------------------------------------
def _task(task: PathLike, metric: str, task_format: str = "trace"):  # -> TaskSpec
    from knowstack.config import TaskConfig
    from knowstack.data.tasks import task_from_config

    path = Path(task)
    try:
        return task_from_config(TaskConfig(name=path.stem, path=path, metric=metric, format=task_format))
    except ValueError as err:
        raise KnowstackError(str(err).splitlines()[-1], path=path) from None


def _task_spec(task: PathLike | TaskSpec, metric: str | None, task_format: str = "trace") -> tuple[TaskSpec, str]:
    """A task given as a dir, or already built (knowstack.data.tasks.TaskSpec: e.g. math's two files), with its
    metric (`metric` where given, else what defines the task: data/tasks.py task_metric) and that metric's source."""
    from dataclasses import replace

    from knowstack.data.tasks import TaskSpec, task_metric

    if isinstance(task, TaskSpec):
        if metric is None:
            return task, "the TaskSpec"
        return replace(task, metric=task_metric(task.test_path, given=metric, option="metric").metric), "metric"
    chosen = task_metric(task, given=metric, task_format=task_format, option="metric")
    return _task(task, chosen.metric, task_format), chosen.source


def _replay_examples(current: tuple[str, list[tuple[str, str]]], earlier: Sequence[PathLike], fraction: float | None,
                     seed: int) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """A replay round's examples: the current task whole, plus fraction x its size from each earlier task dir
    (its train split; default fraction: config.py ReplayConfig's), and the record of what was drawn."""
    from knowstack.config import ReplayConfig
    from knowstack.data.sampling import replay_mixture

    named = []
    for path in map(Path, earlier):
        if not path.is_dir():
            raise KnowstackError("replay takes earlier tasks' dirs (TRACE layout: train.json)", path=path)
        named.append((path.name, [(ex.prompt, ex.answer) for ex in _task(path, "accuracy").load("train")]))
    return replay_mixture(current, named, ReplayConfig().fraction if fraction is None else fraction, seed)


def _never_an_input(out: PathLike, *inputs: PathLike | None) -> None:
    """The API writes `out` as the CLI does, but never over what it reads: an output that is, holds or lies inside
    one of the inputs would destroy it mid-read (the CLI's --out check, without its refusal of a non-empty dir)."""
    from knowstack.errors import raise_problems
    from knowstack.validate import check_out_dir

    raise_problems(check_out_dir(out, overwrite=True, inputs=inputs, option="out"))


@quiet_call
def train(model: PathLike, data: PathLike | TaskSpec | Sequence[tuple[str, str]], out: PathLike, *,
          finetune: str = "lora", metric: str = "accuracy", training: TrainingConfig | None = None, seed: int = 0,
          replay: Sequence[PathLike] = (), replay_fraction: float | None = None,
          olora_previous: Sequence[PathLike] = (), olora_lambda: float | None = None,
          tokenizer: PathLike | None = None, trust_remote_code: bool = False, report_to: Sequence[str] = (),
          **settings: Any) -> dict[str, Any]:
    """One training run, as `knowstack train` and a study's round: `data` is a TRACE task dir (its train split),
    a TaskSpec (knowstack.data.tasks: e.g. math's MetaMathQA file) or (prompt, answer) pairs. The recipe is
    `training` (a config.py TrainingConfig, as a study's `training:`) or else `settings`, train/settings.py
    TrainSettings fields (lr, epochs, max_steps, batch_size, lora_r, ...); each default is TrainingConfig's. On a
    built-in world's model (WORLD/model) given neither, the world's recipe (builtin/world.py world_recipe: its
    study config's `training:`, a fraction of the world's pretraining peak rate); `lr_of_pretrain_peak` needs one.
    replay: earlier tasks' dirs, each adding replay_fraction x |task| of its train examples (default: the config's
    ReplayConfig fraction; what was drawn is written to out/mixture.json). olora_previous: the earlier rounds'
    LoRA adapters, penalised against with weight olora_lambda (default: the paper's first run, OLoraConfig's).
    tokenizer / trust_remote_code: as a study's base options. Writes a full model (fft) or a PEFT adapter (lora)
    with its model card to `out`; returns train_summary.json."""
    from knowstack.atomic import atomic_write_json
    from knowstack.builtin.world import world_of_model, world_recipe
    from knowstack.config import OLoraConfig, TrainingConfig
    from knowstack.train import TrainSettings
    from knowstack.train.launch import TrainJob, run_job
    from knowstack.train.tracking import Tracking

    data_dir = data if isinstance(data, (str, Path)) else None
    _never_an_input(out, model, tokenizer, data_dir, *replay, *olora_previous)
    if olora_previous and finetune != "lora":
        raise KnowstackError("O-LoRA (olora_previous) needs finetune='lora'", field="olora_previous")
    if training is not None and settings:
        raise KnowstackError(f"give the recipe as training or as settings, not both ({', '.join(settings)})",
                             field="training")
    if training is not None and training.add_pad_token:
        # a study grows its base once and builds every model from it; one run alone would leave an adapter no
        # base fits
        raise KnowstackError("add_pad_token is a study's setting (the base every model is built from): give train "
                             "a base grown by it (knowstack.modelio.write_padded_base) and leave it off",
                             field="training.add_pad_token")
    if isinstance(data, (str, Path)) or not isinstance(data, Sequence):
        spec, _ = _task_spec(data, metric)  # training reads no metric
        name, pairs = spec.name, [(ex.prompt, ex.answer) for ex in spec.load("train")]
    else:
        name, pairs = Path(out).name, [(str(prompt), str(answer)) for prompt, answer in data]
    mixture = None
    if replay:
        pairs, mixture = _replay_examples((name, pairs), replay, replay_fraction, seed)
    world = world_of_model(model)
    if training is None and not settings and world is not None:
        training = TrainingConfig.model_validate(world_recipe(world)[1])
    peak = world["pretrain"]["peak_lr"] if world is not None else None
    run_settings = TrainSettings.from_config(training, finetune=finetune, seed=seed, pretrain_peak=peak) \
        if training is not None else TrainSettings(finetune=finetune, seed=seed, **settings)
    lam = OLoraConfig().lambdas[0] if olora_lambda is None else olora_lambda
    trackers = tuple(report_to) or tuple(training.report_to if training is not None else ())
    job = TrainJob(model_path=str(model), out_dir=str(out), settings=run_settings.to_dict(), examples=pairs,
                   progress_desc=f"train {name}",
                   olora={"previous": [str(p) for p in olora_previous], "lambda": lam} if olora_previous else None,
                   tracking=Tracking(trackers, run=Path(out).name).to_dict() if trackers else None,
                   tokenizer=str(tokenizer) if tokenizer else None, trust_remote_code=trust_remote_code)
    summary = run_job(job)
    if mixture is not None:
        atomic_write_json(Path(out) / "mixture.json", mixture)
    return summary


@quiet_call
def merge(method: str, models: Sequence[PathLike], out: PathLike, *, base: PathLike | None = None,
          weights: Sequence[float] | None = None, density: float | None = None, drop_rate: float | None = None,
          lam: float | None = None, lora_space: str | None = None, seed: int | None = None, max_shard_gb: float = 5.0,
          progress: bool = False, statistics: Sequence[PathLike] | None = None, dtype: str = "auto",
          input_hashes: bool = True, **settings: float) -> Path:
    """Merge model dirs and/or LoRA adapter dirs of one base, as `knowstack merge`; returns the merged model dir.
    method: a knowstack name or mergekit's (`linear`, `dare_ties`, ...: combine/merges/). density / drop_rate / lam
    default to config.py MergeConfig's; an option the method does not read is an error naming those it reads, except
    `density` for DARE (`dare`, `ties-dare`), which is mergekit's and PEFT's fraction kept, 1 - drop_rate; seed: the
    random methods' draws (default 0); lora_space: LoRA adapters merged as deltas
    ("delta", the default) or factor by factor ("factors", PEFT's add_weighted_adapter); max_shard_gb: the
    largest output shard; progress: a progress bar on stderr; settings: the other methods' own (t for slerp, gamma
    for breadcrumbs, epsilon for della, max_iter and tol for karcher, regmean_alpha for regmean, fisher_floor for
    fisher; combine/merges/), an unknown one an error. statistics: for regmean and fisher, one statistics dir per
    model, in order (`statistics`). dtype: the output's floating tensors, auto (the base's, the default), float32,
    bfloat16 or float16. input_hashes: False leaves the inputs' sha256 out of the model card (which says so)."""
    from knowstack.combine.merge import merge_models
    from knowstack.combine.merges import get_method

    _never_an_input(out, base, *models, *(statistics or ()))
    given = {"density": density, "drop_rate": drop_rate, "lam": lam, "lora_space": lora_space, "seed": seed,
             **settings}
    options = get_method(method).options_from({name: value for name, value in given.items() if value is not None})
    return merge_models(method, list(models), Path(out), base=base, weights=weights, options=options, seed=seed or 0,
                        max_shard_bytes=int(max_shard_gb * 2**30), progress=progress, statistics=statistics,
                        dtype=dtype, input_hashes=input_hashes)


@quiet_call
def extract_lora(base: PathLike, model: PathLike, out: PathLike, *, rank: int,
                 target_modules: Sequence[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """A full fine-tune `model` of `base` as a PEFT LoRA adapter in `out`, as `knowstack extract-lora`: each targeted
    linear module's delta truncated by SVD to `rank` (combine/extract_lora.py). target_modules: Llama's linear layer
    names (the family's modules holding them) or ["all"] (every linear layer); default the family's LoRA targets.
    Returns the record written to out/extract_lora.json: the explained share of each module's delta energy and
    overall, and the share of the delta in what is not extracted (embeddings, norms, biases), by kind."""
    from knowstack.combine.extract_lora import extract_lora as extract

    return extract(base, model, Path(out), rank=rank, target_modules=target_modules, progress=progress)


@quiet_call
def statistics(model: PathLike, data: PathLike, out: PathLike, *, base: PathLike | None = None,
               kinds: Sequence[str] = ("gram", "fisher"), examples: int | None = None, max_length: int | None = None,
               tokenizer: PathLike | None = None, trust_remote_code: bool = False) -> Path:
    """The statistics of a model's (or, on `base`, a LoRA adapter's) training data that the regmean and fisher merges
    read, as `knowstack statistics`: `kinds` of "gram" (RegMean's input Gram matrices) and "fisher" (the diagonal
    Fisher) on the first `examples` (default config.py MergeConfig's statistics_examples) of the TRACE-format file
    `data`, tokenized as training does with max_length (default TrainingConfig's). Returns the statistics dir."""
    from knowstack.combine.statistics import compute_statistics
    from knowstack.config import MergeConfig, TrainingConfig
    from knowstack.data.formats import load_trace_split

    _never_an_input(out, model, base, data, tokenizer)
    if examples is not None and examples < 1:
        raise KnowstackError("must be at least 1", field="examples")
    if max_length is not None and max_length < 2:
        raise KnowstackError("must be at least 2", field="max_length")
    return compute_statistics(model, load_trace_split(Path(data)), Path(out), base=base, kinds=kinds,
                              max_examples=MergeConfig().statistics_examples if examples is None else examples,
                              max_length=TrainingConfig().max_length if max_length is None else max_length,
                              tokenizer=tokenizer, trust_remote_code=trust_remote_code)


def _prompt_list(prompts: Sequence[str] | PathLike) -> list[str]:
    """One expert's prompts: the strings, or a JSON list / JSONL file of them, as strings or as objects with a
    "prompt" (a TRACE split)."""
    from knowstack.data.formats import read_records

    if not isinstance(prompts, (str, Path)):
        return [str(prompt) for prompt in prompts]
    found = [item if isinstance(item, str) else item.get("prompt") if isinstance(item, dict) else None
             for item in read_records(Path(prompts))]
    if not found or not all(isinstance(p, str) for p in found):
        raise KnowstackError("expected a non-empty list of prompts (strings or {\"prompt\": ...})", path=prompts)
    return found


@quiet_call
def mix(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
        prompts: Sequence[Sequence[str] | PathLike] | None = None, prompts_per_expert: int | None = None,
        train_data: Sequence[PathLike] = (), router_steps: int | None = None, router_lr: float | None = None,
        router_batch_size: int | None = None, aux_loss_coef: float | None = None, max_shard_gb: float = 5.0,
        train_steps: int | None = None, train_lr: float | None = None, train_batch_size: int | None = None,
        **options: Any) -> dict[str, Any]:
    """A mixture of experts of model dirs (FFT-MoE) or adapter dirs (LoRA-MoE), as `knowstack mix`; options are
    combine/moe.py MoeOptions fields (top_k, layers, shared, base_expert, router, seed, attention, routing,
    temperature, dtype, router_dtype, router_init; None: the default). prompts: per
    model, its prompts or a JSON/JSONL file of them, the first prompts_per_expert used (default: config.py
    MoeConfig's); router (None or not given): a study's and compose's, MoeConfig's `prompts`, which needs `prompts`
    (give router="random" for a router without them). Router training: router_steps steps on the TRACE-format files
    train_data (router_lr, router_batch_size, aux_loss_coef default to RouterTrainingConfig's; the order is drawn
    from options' seed; train_steps, train_lr and train_batch_size are their deprecated names). max_shard_gb: the
    largest output shard (FFT-MoE). Returns moe.json."""
    from knowstack.combine.moe import MoeOptions, mix_models
    from knowstack.config import MoeConfig
    from knowstack.data.formats import load_trace_split
    from knowstack.train.router_job import RouterRun
    from knowstack.train.router_training import RouterTraining

    _never_an_input(out, base, *models, *train_data)
    train_steps = _renamed(router_steps, train_steps, "router_steps", "train_steps", 0)
    train_lr = _renamed(router_lr, train_lr, "router_lr", "train_lr", None)
    train_batch_size = _renamed(router_batch_size, train_batch_size, "router_batch_size", "train_batch_size", None)
    if train_data and not train_steps:
        raise KnowstackError("train_data is for router training: give router_steps too", field="router_steps")
    if prompts:
        keep = MoeConfig().prompts_per_expert if prompts_per_expert is None else prompts_per_expert
        prompts = [_prompt_list(given)[:keep] for given in prompts]
    if options.get("router") is None:
        options["router"] = MoeConfig().router
    for name in ("routing", "temperature", "dtype", "router_dtype", "router_init"):  # not given: MoeOptions' defaults
        if name in options and options[name] is None:
            del options[name]
    for name in ("layers", "attention"):  # tuples, as MoeOptions declares them
        if options.get(name) is not None:
            options[name] = tuple(options[name])
    training = None
    if train_steps:
        given = {"lr": train_lr, "batch_size": train_batch_size, "aux_loss_coef": aux_loss_coef}
        training = RouterTraining(steps=train_steps, seed=options.get("seed", 0),
                                  **{name: value for name, value in given.items() if value is not None})
    examples = [example for file in train_data for example in load_trace_split(Path(file))]
    # the mixture is built, then its routers measured (and trained, if asked) before it is complete
    return mix_models(base, list(models), Path(out), options=MoeOptions(**options), prompts=prompts,
                      max_shard_bytes=int(max_shard_gb * 2**30), router_step=RouterRun(prompts, examples, training))


@quiet_call
def gate(base: PathLike, adapter: PathLike, train_data: Sequence[PathLike], *, steps: int | None = None,
         lr: float | None = None, batch_size: int | None = None, max_length: int | None = None,
         seed: int = 0) -> dict[str, Any]:
    """A contributor's gates for their LoRA adapter (PHATGOOSE), as `knowstack gate`: one vector per module the
    adapter targets, trained on the TRACE-format files train_data with base and adapter frozen, written into
    the adapter dir (train/gate_training.py GATES_FILE) for the `gates` router; steps, lr, batch_size default to
    config.py GateTrainingConfig's, max_length to the training recipe's. Returns a summary with the
    loss curve."""
    from knowstack.data.formats import load_trace_split
    from knowstack.train.gate_training import GateTraining, gate_adapter

    given = {"steps": steps, "lr": lr, "batch_size": batch_size, "max_length": max_length}
    settings = GateTraining(seed=seed, **{name: value for name, value in given.items() if value is not None})
    examples = [example for file in train_data for example in load_trace_split(Path(file))]
    return gate_adapter(base, adapter, examples, settings)


@dataclass(frozen=True)
class TaskScores:
    """One task's scores of one model: {metric: value} on n test examples, with the predictions."""

    task: str
    n: int
    scores: dict[str, float]
    predictions: list[dict] = field(default_factory=list, repr=False)
    metric_source: str = ""  # what defined the task's metric (data/tasks.py task_metric), in words


def _load(model: PathLike, adapter: PathLike | None):  # -> (model, tokenizer)
    from knowstack.modelio import load_model, load_tokenizer, on_gpu_if_it_fits

    return on_gpu_if_it_fits(load_model(model, adapter, dtype="float32")), load_tokenizer(model)


def _scores(loaded: Any, tokenizer: Any, spec: TaskSpec, *, limit: int | None, batch_size: int, protocol: str,
            max_new_tokens: int | None = None) -> TaskScores:
    """A loaded model on a task's test split (its first `limit` items); math: lm-eval reads the GSM8K files
    under the paper's protocol, with the eval split as its few-shot examples."""
    from knowstack.evaluate.new_knowledge import HarnessData, evaluate_task

    examples = spec.load("test")[:limit] if limit else spec.load("test")
    harness = HarnessData(test=spec.test_path, fewshot=spec.eval_path, limit=limit) if spec.format == "math" else None
    result = evaluate_task(loaded, tokenizer, examples, spec.metric, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, protocol=protocol, harness=harness)
    return TaskScores(spec.name, len(examples), result.scores, result.predictions)


@quiet_call
def score(model: PathLike, task: PathLike | TaskSpec, *, metric: str | None = None, adapter: PathLike | None = None,
          task_format: str = "trace", limit: int | None = None, eval_batch_size: int | None = None,
          max_new_tokens: int | None = None, protocol: str = DEFAULT_PROTOCOL, batch_size: int | None = None) -> TaskScores:
    """A model (+ adapter) on one task's test split, as `knowstack eval --task` (evaluate/new_knowledge.py);
    metric: default what defines the task (its knowstack-task.json, the built-in world, TRACE's task names; see
    docs/commands.md); protocol: how answers are read and scored (builtin, or paper: the paper's TRACE/GSM8K
    scoring); eval_batch_size: examples per forward pass (default 32; batch_size: its deprecated name)."""
    from dataclasses import replace

    batch_size = _renamed(eval_batch_size, batch_size, "eval_batch_size", "batch_size", EVAL_BATCH_SIZE)
    spec, source = _task_spec(task, metric, task_format)
    loaded, tokenizer = _load(model, adapter)
    scores = _scores(loaded, tokenizer, spec, limit=limit, batch_size=batch_size, protocol=protocol,
                     max_new_tokens=max_new_tokens)
    return replace(scores, metric_source=source)


@quiet_call
def evaluate(model: PathLike, *, adapter: PathLike | None = None, tasks: Mapping[str, PathLike | TaskSpec] | None = None,
             metric: str | None = None, old_tasks: Sequence[str] = (), include_path: PathLike | None = None,
             limit: int | None = None, eval_batch_size: int | None = None, protocol: str = DEFAULT_PROTOCOL,
             batch_size: int | None = None) -> dict[str, dict[str, float]]:
    """`knowstack eval` for several tasks at once: {task: {metric: value}} for each new task (tasks: {name: dir,
    or a TaskSpec}, each scored with its own metric, or with `metric` where given) and each lm-eval old-knowledge
    task; the model is loaded once. eval_batch_size: examples per forward pass (default 32; batch_size: its
    deprecated name)."""
    from knowstack.evaluate.old_knowledge import evaluate_old_knowledge

    batch_size = _renamed(eval_batch_size, batch_size, "eval_batch_size", "batch_size", EVAL_BATCH_SIZE)
    if not tasks and not old_tasks:
        raise KnowstackError("nothing to evaluate: give tasks and/or old_tasks")
    specs = {name: _task_spec(path, metric)[0] for name, path in (tasks or {}).items()}
    loaded, tokenizer = _load(model, adapter)
    result: dict[str, dict[str, float]] = {
        name: _scores(loaded, tokenizer, spec, limit=limit, batch_size=batch_size, protocol=protocol).scores
        for name, spec in specs.items()}
    if old_tasks:
        result.update(evaluate_old_knowledge(loaded, tokenizer, list(old_tasks), batch_size=batch_size, limit=limit,
                                             include_path=Path(include_path) if include_path else None))
    return result


@quiet_call
def score_predictions(task: PathLike, predictions: PathLike | Sequence[str], *, metric: str | None = None,
                      task_format: str = "trace", protocol: str = DEFAULT_PROTOCOL) -> TaskScores:
    """Predictions made elsewhere (vLLM, another harness) scored on a task's test split with the same reading
    and metrics as an evaluation, as `knowstack score`: task is a TRACE task dir or, with task_format="math", a
    GSM8K-format test file; predictions one per test item, in order: the strings, or a file (JSON Lines of
    {"prediction": ...}, or a JSON list of strings); metric: default what defines the task, as `score` and
    `evaluate` read it (data/tasks.py task_metric)."""
    from knowstack.config import TaskConfig
    from knowstack.data.tasks import task_from_config, task_metric
    from knowstack.evaluate.new_knowledge import score_given_predictions
    from knowstack.evaluate.predictions import read_predictions

    where = Path(task)
    chosen = task_metric(where, given=metric, task_format=task_format, option="metric")
    metric = chosen.metric
    fields = {"path": where} if task_format == "trace" else {"test_file": where}
    examples = task_from_config(TaskConfig(name="task", format=task_format, metric=metric, **fields)).load("test")
    if isinstance(predictions, (str, Path)):
        given = read_predictions(Path(predictions), len(examples))
    elif len(predictions) != len(examples):
        raise KnowstackError(f"{len(predictions)} predictions for {len(examples)} test items", field="predictions")
    else:
        given = [str(prediction) for prediction in predictions]
    result = score_given_predictions(examples, given, metric, protocol)
    return TaskScores(where.name, len(examples), result.scores, result.predictions, chosen.source)


# --- registries ----------------------------------------------------------------------------------------
@quiet_call
def init_registry(root: PathLike, base: PathLike, *, old_tasks: Sequence[str] = (),
                  include_path: PathLike | None = None, eval_batch_size: int | None = None, limit: int | None = None,
                  batch_size: int | None = None, protocol: str | None = None, num_fewshot: int | None = None,
                  add_bos_token: bool | None = None) -> dict[str, Any]:
    """Create a registry (a new or empty dir, or a URL fsspec reaches) for the base model dir `base`, scored on
    the lm-eval tasks old_tasks (include_path: a dir of their YAMLs; limit: items per task; eval_batch_size:
    default 32, batch_size its deprecated name), as `knowstack registry init` (registry/base.py); returns the
    base's record. protocol: how every score the registry records is made, as a study's evaluation.protocol
    (default the study's default, builtin); num_fewshot, add_bos_token: lm-eval's, as a study's old_knowledge
    section's (add_bos_token also its evaluation's; default: each task's few-shot count, the tokenizer's BOS)."""
    from knowstack.registry.base import init_registry as init

    batch_size = _renamed(eval_batch_size, batch_size, "eval_batch_size", "batch_size", EVAL_BATCH_SIZE)
    return init(root, base, old_tasks=old_tasks, include_path=include_path, batch_size=batch_size, limit=limit,
                protocol=protocol or DEFAULT_PROTOCOL, num_fewshot=num_fewshot, add_bos_token=add_bos_token)


def open_registry(root: PathLike) -> Registry:
    """A registry (registry/core.py), to use in a `with` block: .versions(), .version(name), .base(), .view(name)."""
    from knowstack.registry.core import Registry

    return Registry.open(root)


@quiet_call
def contribute(root: PathLike, name: str, *, task: PathLike, adapter: PathLike | None = None,
               model: PathLike | None = None, metric: str | None = None, keep_data: bool = False,
               task_format: str = "trace", author: str | None = None, training_config: PathLike | None = None,
               eval_batch_size: int | None = None, statistics: PathLike | None = None,
               batch_size: int | None = None, as_lora: int | None = None) -> dict[str, Any]:
    """Add a LoRA adapter dir or a fine-tuned model dir of the registry's base, scored on its task (a TRACE-layout
    dir; keep_data: store its train split too), as `knowstack contribute` (registry/contribute.py); returns its
    record. metric: default what defines the task, as `score` reads it. statistics: its statistics dir
    (`statistics`), for the merge-regmean / merge-fisher composes. eval_batch_size: default 32 (batch_size: its
    deprecated name). as_lora: a rank: the fine-tuned `model` contributed as the LoRA adapter extracted from it
    (`extract_lora`)."""
    from knowstack.registry.contribute import contribute as add

    batch_size = _renamed(eval_batch_size, batch_size, "eval_batch_size", "batch_size", EVAL_BATCH_SIZE)
    return add(root, name, task=task, adapter=adapter, model=model, metric=metric, keep_data=keep_data,
               task_format=task_format, author=author, training_config=training_config, batch_size=batch_size,
               statistics=statistics, as_lora=as_lora)


@quiet_call
def compose(root: PathLike, method: str, *, options: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Build, score and gate the next version, as `knowstack compose` (registry/compose.py); options are
    ComposeOptions fields (density, lr, epochs, top_k, ...), each one the method reads (or one error naming those
    it reads). eval_batch_size: the evaluation's batch (default 32; batch_size: its deprecated name). Returns the
    new version's record."""
    from knowstack.registry.compose import compose as build
    from knowstack.registry.compose import options_from

    kwargs["batch_size"] = _renamed(kwargs.pop("eval_batch_size", None), kwargs.pop("batch_size", None),
                                    "eval_batch_size", "batch_size", EVAL_BATCH_SIZE)
    return build(root, method, options=options_from(dict(options or {}), method), **kwargs)


def history(root: PathLike) -> list[dict[str, Any]]:
    """Every version's record, newest first, as `knowstack log` lists them (scores, parents, gate)."""
    with open_registry(root) as reg:
        return list(reversed(reg.versions()))


@quiet_call
def export(root: PathLike, version: str, out: PathLike, *, with_base: bool = False,
           overwrite: bool = False) -> dict[str, Any]:
    """A version as a plain HF model dir or PEFT / LoRA-MoE dir in `out` (a new or empty dir; overwrite: replace a
    non-empty one), with its model card, as `knowstack export` (registry/export.py); with_base: adapters get the
    base model in out/base too. Returns the export record (version, kind, method, how to load it)."""
    from knowstack.registry.export import export_version

    return export_version(root, version, out, with_base=with_base, overwrite=overwrite)
