"""`knowstack contribute`: add one contributor's LoRA adapter or fine-tuned model to a registry.

Order matters for what others can see: everything is checked first (name, task, that the weights are a
fine-tune of the registry's base), then the objects are stored, then the contribution is scored from the
stored copies (so its score is the score of exactly what the registry holds), and only then is its
record committed in one transaction. A contribution that fails at any point leaves no record; objects it
stored before failing are complete files no record points to, harmless and shared with any later retry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from knowstack.combine.compatibility import check_compatible
from knowstack.combine.extract_lora import check_rank
from knowstack.combine.inputs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FullModel, LoraAdapter
from knowstack.config import EVAL_BATCH_SIZE
from knowstack.data.formats import trace_split_path
from knowstack.data.tasks import ResolvedMetric, read_split, task_metric
from knowstack.errors import InputProblems, KnowstackError
from knowstack.hashing import content_hash
from knowstack.registry import db
from knowstack.registry.base import model_files, store_files, weights_hash
from knowstack.registry.core import BASE_NAME, STATISTICS, Registry, check_name
from knowstack.registry.evaluate import score_model, task_of, without_items

TASK_FORMATS = ("trace", "math")
# The version's settings field that says what defined its task's metric (--metric, knowstack-task.json, ...).
METRIC_SOURCE = "metric_source"


@dataclass(frozen=True)
class TaskFiles:
    """A TRACE task dir's splits to store: test always, eval when present, train only when data is kept."""

    name: str
    task_format: str
    splits: dict[str, Path]
    counts: dict[str, int]


def read_task(task_dir: str | Path, *, keep_data: bool, task_format: str = "trace") -> TaskFiles:
    """trace: TRACE's train/eval/test JSON; math: MetaMathQA-format train, GSM8K-format eval/test (same names)."""
    if task_format not in TASK_FORMATS:
        raise KnowstackError(f"unknown task format '{task_format}' (known: {', '.join(TASK_FORMATS)})",
                             field="task_format")
    task_dir = Path(task_dir).expanduser()
    # split -> required; without --keep-data the train split is neither read nor stored
    wanted = {"test": True, "eval": False, **({"train": True} if keep_data else {})}
    splits, counts = {}, {}
    for split, required in wanted.items():
        try:
            path = trace_split_path(task_dir, split)
        except KnowstackError:
            if required:
                raise
            continue
        examples = read_split(task_format, split, path)  # validates every item before anything is stored
        if not examples:
            raise KnowstackError(f"the {split} split is empty", path=path)
        splits[split], counts[split] = path, len(examples)
    return TaskFiles(task_dir.resolve().name, task_format, splits, counts)


def open_contribution(adapter: str | Path | None, model: str | Path | None) -> FullModel | LoraAdapter:
    if (adapter is None) == (model is None):
        raise KnowstackError("give exactly one of --adapter (a PEFT LoRA dir) or --model (a fine-tuned model dir)")
    path = Path(adapter if adapter is not None else model).expanduser()  # type: ignore[arg-type]
    if not path.is_dir():
        raise KnowstackError("contribution dir not found", path=path)
    if adapter is not None:
        if not (path / ADAPTER_CONFIG).is_file():
            raise KnowstackError(f"not a PEFT adapter dir (no {ADAPTER_CONFIG})", path=path)
        return LoraAdapter(path)  # refuses pickled-only adapters and non-plain LoRA
    if (path / ADAPTER_CONFIG).is_file():
        raise KnowstackError("this is a LoRA adapter dir: contribute it with --adapter", path=path)
    return FullModel(path)  # refuses a dir with only pickled weights


def check_trained_from(base: FullModel, base_hash: str, contribution: FullModel | LoraAdapter) -> None:
    """One clear error unless `contribution` is a fine-tune (or adapter) of `base` (content hash `base_hash`): the
    compatibility checks of every combination (combine/compatibility.py: config, tensors or targets, tokenizer, chat
    template), then, for an adapter whose recorded base is a local dir, that dir's hash."""
    check_compatible(base, [contribution], name="the registry's base")
    if isinstance(contribution, LoraAdapter):
        claimed = contribution.base_model_path()
        _check_claimed_hash(base_hash, contribution, Path(claimed).expanduser() if claimed else None)


def _check_claimed_hash(base_hash: str, adapter: LoraAdapter, claimed: Path | None) -> None:
    """An adapter whose recorded base is a local model dir must name exactly the registry's base (same hash):
    a sibling model of the same architecture would pass every shape check and still be the wrong base."""
    if claimed is None or not (claimed / "config.json").is_file():
        return  # a hub id or a dir gone since: the shapes are all there is to check
    try:
        theirs = weights_hash(FullModel(claimed))
    except KnowstackError:
        return  # not a readable safetensors model dir; shapes decide
    if theirs != base_hash:
        raise KnowstackError(f"the adapter was trained from {claimed}, whose weights (hash {theirs[:12]}) are not "
                             "the registry's base", path=adapter.path / ADAPTER_CONFIG, field="base_model_name_or_path")


def contribution_files(contribution: FullModel | LoraAdapter) -> tuple[dict[str, Path], list[str]]:
    if isinstance(contribution, LoraAdapter):
        from knowstack.modeling.routing import GATES_FILE  # the contributor's gates (PHATGOOSE), if trained

        names = [ADAPTER_CONFIG, ADAPTER_WEIGHTS] + [GATES_FILE] * (contribution.path / GATES_FILE).is_file()
        return {name: contribution.path / name for name in names}, names
    return model_files(contribution, with_tokenizer=False)


def contribute(
    root: str | Path,
    name: str,
    *,
    task: str | Path,
    adapter: str | Path | None = None,
    model: str | Path | None = None,
    metric: str | None = None,
    keep_data: bool = False,
    task_format: str = "trace",
    author: str | None = None,
    training_config: str | Path | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    statistics: str | Path | None = None,
    as_lora: int | None = None,
) -> dict[str, Any]:
    """Check, store, score and record one contribution; returns its record as `Registry.version` gives it.
    statistics: a statistics dir of the contribution on its own training data (`knowstack statistics`), stored
    beside its weights for the composes that read them (merge-regmean, merge-fisher) instead of the data.
    metric: default what defines the task (data/tasks.py task_metric); the record keeps where it came from.
    as_lora: a rank: the fine-tuned `model` is contributed as the LoRA adapter extracted from it at that rank
    (combine/extract_lora.py), so that it joins LoRA merges and LoRA-MoEs; its explained share is recorded."""
    check_name(name)
    if as_lora is not None and model is None:
        raise KnowstackError("as_lora extracts a LoRA adapter from a full fine-tune: give the model, not an adapter",
                             field="as_lora")
    if as_lora is not None:
        check_rank(as_lora, field="as_lora")
    chosen = task_metric(task, given=metric, task_format=task_format, option="metric")
    if metric is not None:  # recorded and shown as where it came from ('metric from metric' said nothing)
        chosen = ResolvedMetric(chosen.metric, GIVEN_METRIC)
    config_path = Path(training_config).expanduser() if training_config is not None else None
    if config_path is not None and not config_path.is_file():
        raise KnowstackError("training config file not found", path=config_path)
    with Registry.open(root) as reg:
        if reg.name_taken(name):  # early, before any work; the commit checks again
            raise KnowstackError(f"the name '{name}' is taken in this registry: choose another",
                                 path=reg.where, field="name")
        task_files = read_task(task, keep_data=keep_data, task_format=task_format)
        contribution = open_contribution(adapter, model)
        with reg.view(BASE_NAME) as base_dir:
            with users_paths({base_dir: base_source(reg)}):
                check_trained_from(FullModel(base_dir), reg.base()["content_hash"], contribution)
                with extracted(as_lora, base_dir, contribution, base_source(reg)) as (contribution, extraction):
                    stats_files = statistics_files(statistics, FullModel(base_dir), contribution)
                    new = _store(reg, name, contribution, task_files, chosen, keep_data, author, config_path,
                                 stats_files)
            if extraction is not None:
                new.settings.update(extraction)
            new.scores = without_items(_score(reg, base_dir, new, batch_size))
        reg.record(new)
        return reg.version(name)


@contextlib.contextmanager
def extracted(rank: int | None, base_dir: Path, contribution: FullModel | LoraAdapter,
              base_name: str) -> Iterator[tuple[FullModel | LoraAdapter, dict[str, Any] | None]]:
    """The contribution as stored: itself, or (with a rank) the LoRA adapter extracted from it at that rank, in a
    temporary dir while it is stored, with what the version's settings record of the extraction (the model it came
    from as its source, the rank, the explained shares)."""
    if rank is None:
        yield contribution, None
        return
    import tempfile

    from knowstack.combine.extract_lora import extract_lora

    with tempfile.TemporaryDirectory(prefix="knowstack-extract-") as tmp:
        record = extract_lora(base_dir, contribution.path, Path(tmp) / "adapter", rank=rank, base_name=base_name)
        yield LoraAdapter(Path(tmp) / "adapter"), {
            "source": str(contribution.path.resolve()),
            "extracted_lora": {key: record[key] for key in ("rank", "target_modules", "explained",
                                                            "explained_of_whole_delta", "not_extracted")}}


def base_source(reg: Registry) -> str:
    """The registry's base as its user knows it: the dir it was made from (registry init --base)."""
    return reg.base()["settings"].get("source") or f"{reg.where} (its base)"


@contextlib.contextmanager
def users_paths(shown: dict[Path, str]) -> Iterator[None]:
    """Errors name the user's paths (the base the registry was made from, the contribution handed in), not the
    temporary views of the registry's stored copies that were checked or loaded ({view: what to show})."""

    def named(text: str | None) -> str | None:
        for view, user in sorted(shown.items(), key=lambda item: -len(str(item[0]))):
            for form in {str(view), str(Path(view).resolve())}:
                text = text.replace(form, user) if text else text
        return text

    try:
        yield
    except InputProblems as err:
        raise InputProblems([replace(p, path=named(p.path), message=named(p.message) or "")
                             for p in err.problems]) from None
    except KnowstackError as err:
        if named(str(err)) == str(err):
            raise
        raise KnowstackError(named(str(err)) or "") from None


def statistics_files(folder: str | Path | None, base: FullModel,
                     contribution: FullModel | LoraAdapter) -> dict[str, Path] | None:
    """A contributed statistics dir's files, each kind checked (its hash, that it is statistics of this model's
    weights) before anything is stored."""
    from knowstack.combine.statistics import STATISTICS_FILE, check_statistics, open_statistics, read_record

    if folder is None:
        return None
    folder = Path(folder).expanduser()
    kinds = list(read_record(folder)["statistics"])
    if not kinds:
        raise KnowstackError("the statistics dir holds no statistics", path=folder / STATISTICS_FILE)
    shapes = {name: tuple(spec.shape) for name, spec in base.specs.items()}
    files = {STATISTICS_FILE: folder / STATISTICS_FILE}
    for kind in kinds:
        stats = open_statistics(folder, kind)
        check_statistics(stats, shapes)
        if isinstance(contribution, LoraAdapter) and not stats.names() <= contribution.names():
            raise KnowstackError(f"'{kind}' statistics of weights the adapter does not target: these are another "
                                 "model's statistics", path=folder)
        entry = stats.record["statistics"][kind]
        files[entry["file"]] = folder / entry["file"]
    return files


# The recorded source of a metric the contributor named (contribute --metric, the API's metric argument).
GIVEN_METRIC = "its contributor (--metric)"


def _store(reg: Registry, name: str, contribution: FullModel | LoraAdapter, task: TaskFiles, metric: ResolvedMetric,
           keep_data: bool, author: str | None, config_path: Path | None,
           stats_files: dict[str, Path] | None = None) -> db.NewVersion:
    files, hashed = contribution_files(contribution)
    names, sizes = store_files(reg.store, files)
    settings: dict[str, Any] = {"source": str(contribution.path.resolve()), METRIC_SOURCE: metric.source}
    if stats_files is not None:  # in the version's settings, its objects kept with the version's
        stats_names, stats_sizes = store_files(reg.store, stats_files)
        sizes.update(stats_sizes)
        settings[STATISTICS] = stats_names
    split_shas, split_sizes = store_files(reg.store, task.splits)
    sizes.update(split_sizes)
    recorded_config = None
    if config_path is not None:
        sha, size = reg.store.put_file(config_path)
        sizes[sha] = size
        recorded_config = {"file": config_path.name, "sha256": sha}
    task_record = {split: {"file": path.name, "sha256": split_shas[split], "n": task.counts[split]}
                   for split, path in task.splits.items()}
    return db.NewVersion(
        name=name, kind="adapter" if isinstance(contribution, LoraAdapter) else "model", method="contribution",
        files=names, content_hash=content_hash({n: names[n] for n in hashed}), objects=sizes,
        settings=settings, author=author, parents=[BASE_NAME],
        contribution={"task": task.name, "task_format": task.task_format, "metric": metric.metric,
                      "task_files": task_record,
                      "keep_data": keep_data, "training_config": recorded_config})


def _score(reg: Registry, base_dir: Path, new: db.NewVersion, batch_size: int) -> list[dict[str, Any]]:
    """The contribution's score rows on its own task's test split, from the stored (verified) copies, made by the
    study's evaluation step under the registry's protocol (registry/evaluate.py)."""
    import tempfile

    assert new.contribution is not None
    task = task_of({**new.contribution, "name": new.name})  # the record it is about to become
    with reg.store.view(new.files) as weights_dir, tempfile.TemporaryDirectory(prefix="knowstack-score-") as work, \
            users_paths({weights_dir: new.settings["source"], base_dir: base_source(reg)}):
        entry = task.study_task(reg.store, Path(work) / "task")
        full = new.kind == "model"
        return score_model(Path(work) / "eval", base_dir, weights_dir if full else base_dir,
                           None if full else weights_dir, [entry], None, protocol=reg.protocol,
                           batch_size=batch_size, harness=reg.harness)
