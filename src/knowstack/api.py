"""knowstack's Python API: what the CLI does, for notebooks and scripts (docs/api.md).

    import knowstack as ks
    merged = ks.merge("ties", ["a1", "a2", "a3"], "out/merged", base="base-model")
    ks.score(merged, "data/Stance")                      # TaskScores(task='Stance', n=..., scores={...})
    study = ks.run_study("configs/builtin-quick.yaml", "runs/quick")
    study.dataframe()                                    # pandas, if installed; study.rows always

Every function calls the same code the matching CLI command calls (train/loop, combine/merge, combine/moe,
evaluate/*, study/runner, registry/*), so results are the same either way. Bad input raises
knowstack.errors.KnowstackError naming the file, field and item. Heavy libraries (torch, transformers) are
imported only by the functions that need them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowstack.errors import KnowstackError

if TYPE_CHECKING:
    import pandas

    from knowstack.config import StudyConfig
    from knowstack.registry.core import Registry
    from knowstack.study.results import Row

PathLike = str | Path

__all__ = [
    "PlannedStep", "StudyResults", "TaskScores", "compose", "contribute", "dry_run", "evaluate", "history",
    "init_registry", "load_study", "merge", "mix", "open_registry", "rows_frame", "run_study", "score",
    "study_results", "train",
]


# --- studies -------------------------------------------------------------------------------------------
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


def dry_run(config: PathLike | Mapping[str, Any] | StudyConfig, out: PathLike,
            gpu_memory_gib: float = 80.0) -> list[PlannedStep]:
    """The plan of a study in `out`: every step, whether it is done, and its memory estimate; runs nothing."""
    from knowstack.study.plan import build_plan
    from knowstack.study.resources import GiB, estimate_plan

    plan = build_plan(load_study(config), Path(out))
    estimates = dict((step.key, est) for step, est in estimate_plan(plan, int(gpu_memory_gib * GiB))[0])
    return [PlannedStep(i, s.key, s.kind, s.label, (Path(out) / "artifacts" / s.key).is_dir(), estimates.get(s.key))
            for i, s in enumerate(plan.ordered(), start=1)]


@dataclass
class StudyResults:
    """A study dir's results: one Row per (model, task, metric) (study/results.py), its results.csv and report."""

    out: Path
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


def rows_frame(rows: Sequence[Row]) -> pandas.DataFrame:
    """Rows as a pandas DataFrame (results.csv's columns); pandas is optional: pip install pandas."""
    try:
        import pandas
    except ImportError:
        raise KnowstackError("a DataFrame needs pandas: pip install pandas (or use .rows / .records())") from None
    return pandas.DataFrame([row.record() for row in rows])


def run_study(config: PathLike | Mapping[str, Any] | StudyConfig, out: PathLike, *, executor: str = "local",
              address: str | None = None, console: Any = None) -> StudyResults:
    """Run (or resume) a study into `out`, as `knowstack study CONFIG --out OUT` does; returns its results.
    console: a rich Console for progress (default: stderr)."""
    from knowstack.study.executors import make_executor
    from knowstack.study.runner import run_study as run

    text = Path(config).read_text(encoding="utf-8") if isinstance(config, (str, Path)) else None
    study = load_study(config)
    run(study, Path(out), console=console, config_text=text, executor=make_executor(executor, address))
    return study_results(out, study)


def study_results(out: PathLike, config: PathLike | Mapping[str, Any] | StudyConfig | None = None) -> StudyResults:
    """The results of a study dir so far (a running study: the evaluations finished); config defaults to the
    dir's config.yaml."""
    from knowstack.report.build import study_rows
    from knowstack.study.plan import build_plan

    out = Path(out)
    if config is None:
        if not (out / "config.yaml").is_file():
            raise KnowstackError("not a study dir (no config.yaml): pass the config too", path=out)
        config = out / "config.yaml"
    return StudyResults(out, study_rows(build_plan(load_study(config), out), out))


# --- one model at a time ---------------------------------------------------------------------------------
def _task(task: PathLike, metric: str, task_format: str = "trace"):  # -> TaskSpec
    from knowstack.config import TaskConfig
    from knowstack.data.tasks import task_from_config

    path = Path(task)
    try:
        return task_from_config(TaskConfig(name=path.stem, path=path, metric=metric, format=task_format))
    except ValueError as err:
        raise KnowstackError(str(err).splitlines()[-1], path=path) from None


def train(model: PathLike, data: PathLike | Sequence[tuple[str, str]], out: PathLike, *, finetune: str = "lora",
          metric: str = "accuracy", report_to: Sequence[str] = (), olora_previous: Sequence[PathLike] = (),
          olora_lambda: float = 0.5, **settings: Any) -> dict[str, Any]:
    """One training run, as `knowstack train`: `data` is a TRACE task dir (its train split) or (prompt, answer)
    pairs; settings are train/settings.py TrainSettings fields (lr, epochs, max_steps, batch_size, lora_r, ...).
    Writes a full model (fft) or a PEFT adapter (lora) with its model card to `out`; returns train_summary.json."""
    from knowstack.train import TrainSettings
    from knowstack.train.launch import TrainJob, run_job
    from knowstack.train.tracking import Tracking

    if isinstance(data, (str, Path)):
        pairs = [(ex.prompt, ex.answer) for ex in _task(data, metric).load("train")]
    else:
        pairs = [(str(prompt), str(answer)) for prompt, answer in data]
    if olora_previous and finetune != "lora":
        raise KnowstackError("O-LoRA (olora_previous) needs finetune='lora'", field="olora_previous")
    job = TrainJob(model_path=str(model), out_dir=str(out), examples=pairs,
                   settings=TrainSettings(finetune=finetune, **settings).to_dict(),
                   olora={"previous": [str(p) for p in olora_previous], "lambda": olora_lambda}
                   if olora_previous else None,
                   tracking=Tracking(tuple(report_to), run=Path(out).name).to_dict() if report_to else None)
    return run_job(job)


def merge(method: str, models: Sequence[PathLike], out: PathLike, *, base: PathLike | None = None,
          weights: Sequence[float] | None = None, density: float | None = None, drop_rate: float | None = None,
          lam: float | None = None, seed: int = 0) -> Path:
    """Merge model dirs and/or LoRA adapter dirs of one base, as `knowstack merge`; returns the merged model dir."""
    from knowstack.combine.merge import merge_models
    from knowstack.combine.merge_methods import MergeOptions

    given = {"density": density, "drop_rate": drop_rate, "lam": lam}
    options = MergeOptions(**{name: value for name, value in given.items() if value is not None})
    return merge_models(method, list(models), Path(out), base=base, weights=weights, options=options, seed=seed)


def mix(base: PathLike, models: Sequence[PathLike], out: PathLike, *, prompts: Sequence[Sequence[str]] | None = None,
        **options: Any) -> dict[str, Any]:
    """A mixture of experts of model dirs (FFT-MoE) or adapter dirs (LoRA-MoE), as `knowstack mix`; options are
    combine/moe.py MoeOptions fields (top_k, layers, shared, base_expert, router, seed, attention). Router
    default: `prompts` when prompts are given, else random. Returns moe.json."""
    from knowstack.combine.moe import MoeOptions, default_router, mix_models

    options.setdefault("router", default_router(bool(prompts)))
    return mix_models(base, list(models), Path(out), options=MoeOptions(**options), prompts=prompts)


@dataclass(frozen=True)
class TaskScores:
    """One task's scores of one model: {metric: value} on n test examples, with the predictions."""

    task: str
    n: int
    scores: dict[str, float]
    predictions: list[dict] = field(default_factory=list, repr=False)


def _load(model: PathLike, adapter: PathLike | None):  # -> (model, tokenizer)
    from knowstack.modelio import load_model, load_tokenizer, on_gpu_if_it_fits

    return on_gpu_if_it_fits(load_model(model, adapter, dtype="float32")), load_tokenizer(model)


def score(model: PathLike, task: PathLike, *, metric: str = "accuracy", adapter: PathLike | None = None,
          task_format: str = "trace", limit: int | None = None, batch_size: int = 32,
          max_new_tokens: int | None = None) -> TaskScores:
    """A model (+ adapter) on one task's test split, as `knowstack eval --task` (evaluate/new_knowledge.py)."""
    from knowstack.evaluate.new_knowledge import evaluate_task

    spec = _task(task, metric, task_format)
    examples = spec.load("test")[:limit] if limit else spec.load("test")
    loaded, tokenizer = _load(model, adapter)
    result = evaluate_task(loaded, tokenizer, examples, spec.metric, batch_size=batch_size,
                           max_new_tokens=max_new_tokens)
    return TaskScores(spec.name, len(examples), result.scores, result.predictions)


def evaluate(model: PathLike, *, adapter: PathLike | None = None, tasks: Mapping[str, PathLike] | None = None,
             metric: str = "accuracy", old_tasks: Sequence[str] = (), include_path: PathLike | None = None,
             limit: int | None = None, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """`knowstack eval` for several tasks at once: {task: {metric: value}} for each new task (tasks: {name: dir},
    all scored with `metric`) and each lm-eval old-knowledge task; the model is loaded once."""
    from knowstack.evaluate.new_knowledge import evaluate_task
    from knowstack.evaluate.old_knowledge import evaluate_old_knowledge

    if not tasks and not old_tasks:
        raise KnowstackError("nothing to evaluate: give tasks and/or old_tasks")
    loaded, tokenizer = _load(model, adapter)
    result: dict[str, dict[str, float]] = {}
    for name, path in (tasks or {}).items():
        spec = _task(path, metric)
        examples = spec.load("test")[:limit] if limit else spec.load("test")
        result[name] = evaluate_task(loaded, tokenizer, examples, spec.metric, batch_size=batch_size).scores
    if old_tasks:
        result.update(evaluate_old_knowledge(loaded, tokenizer, list(old_tasks), batch_size=batch_size, limit=limit,
                                             include_path=Path(include_path) if include_path else None))
    return result


# --- registries ----------------------------------------------------------------------------------------
def init_registry(root: PathLike, base: PathLike, **kwargs: Any) -> dict[str, Any]:
    """Create a registry for `base`, as `knowstack registry init` (registry/base.py init_registry)."""
    from knowstack.registry.base import init_registry as init

    return init(root, base, **kwargs)


def open_registry(root: PathLike) -> Registry:
    """A registry (registry/core.py), to use in a `with` block: .versions(), .version(name), .base(), .view(name)."""
    from knowstack.registry.core import Registry

    return Registry.open(root)


def contribute(root: PathLike, name: str, **kwargs: Any) -> dict[str, Any]:
    """Add an adapter or fine-tuned model, as `knowstack contribute` (registry/contribute.py); returns its record."""
    from knowstack.registry.contribute import contribute as add

    return add(root, name, **kwargs)


def compose(root: PathLike, method: str, *, options: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Build, score and gate the next version, as `knowstack compose` (registry/compose.py); options are
    ComposeOptions fields (density, lr, epochs, top_k, ...). Returns the new version's record."""
    from knowstack.registry.compose import compose as build
    from knowstack.registry.compose import options_from

    return build(root, method, options=options_from(dict(options or {})), **kwargs)


def history(root: PathLike) -> list[dict[str, Any]]:
    """Every version's record, newest first, as `knowstack log` lists them (scores, parents, gate)."""
    with open_registry(root) as reg:
        return list(reversed(reg.versions()))
