"""Runs a study's plan: skips finished steps, resumes cut-off ones, then writes the results.

The report is its caller's to write (report/ sits above study/ and reads results only): `knowstack study` and
`knowstack.api.run_study` write it with report.build.write_study_report from the results this module writes."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from knowstack.atomic import atomic_write_json, atomic_write_text
from knowstack.config import StudyConfig, old_metric_of
from knowstack.errors import KnowstackError
from knowstack.results import (
    COSTS_CSV,
    PER_EXAMPLE,
    SEARCH_CSV,
    STUDY_INFO,
    Row,
    write_costs_csv,
    write_csv,
    write_items,
    write_search_csv,
    write_sqlite,
    write_study_info,
)
from knowstack.study.costs import collect_costs
from knowstack.study.executors import Executor, LocalExecutor
from knowstack.study.plan import Plan, Step, build_plan
from knowstack.study.results import collect_items, collect_rows, study_info
from knowstack.study.shared_cache import SharedCache, StudyReuse
from knowstack.study.steps import StudyContext
from knowstack.validate import check_study, check_study_out, raise_problems

if TYPE_CHECKING:
    from knowstack.study.resources import Estimate


@dataclass
class StudyOutcome:
    """A finished run: where its results are, and the plan and rows its report is written from."""

    out: Path
    results_csv: Path
    plan: Plan
    rows: list[Row]
    steps_run: int
    steps_skipped: int
    steps_reused: int = 0  # linked from the shared step cache (study/shared_cache.py)


@contextlib.contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """One runner per study dir: a second one would race on the same artifacts."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KnowstackError("another knowstack process is running this study", path=out) from None
        yield


def context_for(plan: Plan, out: Path, shared: SharedCache | None = None) -> StudyContext:
    world = next((step.key for step in plan.ordered() if step.kind == "world"), None)
    return StudyContext(out=out, config=plan.config, world_key=world, shared=shared)


@dataclass(frozen=True)
class DryPlan:
    """What a dry run shows: the plan (keyed by the shared cache's built world where the study dir has none), the
    steps done in the study dir, and those a run would link from the shared step cache at `cache` (None: off)."""

    plan: Plan
    done: frozenset[str]
    cached: frozenset[str]
    cache: Path | None


def dry_plan(config: StudyConfig, out: Path, shared_cache: bool | None = None) -> DryPlan:
    """The plan a run of `config` in `out` would carry out; shared_cache as `run_study`'s."""
    from knowstack.study.shared_cache import cached_keys, default_root, world_entry

    plan = build_plan(config, out)
    root = default_root() if (config.executor.shared_cache if shared_cache is None else shared_cache) else None
    if root is not None and plan.world_pending:
        world = world_entry(plan, root)
        plan = build_plan(config, out, world) if world is not None else plan
    done = frozenset(step.key for step in plan.ordered() if (out / "artifacts" / step.key).is_dir())
    cached = frozenset(cached_keys(plan, root)) - done if root is not None and root.is_dir() else frozenset()
    return DryPlan(plan, done, cached, root)


def describe_plan(dry: DryPlan, out: Path, console: Console) -> None:
    plan = dry.plan
    table = Table(title=f"plan of study '{plan.config.name}' in {out}")
    for column in ("#", "step", "kind", "settings", "status"):
        table.add_column(column)
    for index, step in enumerate(plan.ordered(), start=1):
        status = ("[green]done[/green]" if step.key in dry.done else
                  "[cyan]in the shared cache[/cyan]" if step.key in dry.cached else "to do")
        table.add_row(str(index), step.key, step.kind, step_settings(step), status)
    # wide enough for every column even where stderr is not a terminal (80 columns by default)
    Console(file=console.file, width=max(console.width, 150)).print(table)
    cached = f", {len(dry.cached)} in the shared cache {dry.cache} (linked, not run)" if dry.cached else ""
    console.print(f"{len(plan.steps)} steps, {len(dry.done)} done{cached}, {len(plan.evaluations)} models evaluated",
                  soft_wrap=True)
    old = plan.config.old_knowledge
    if isinstance(old.tasks, list):
        console.print("old knowledge: " + ", ".join(f"{task} ({old_metric_of(old.metric, task)})" for task in old.tasks),
                      soft_wrap=True)


def step_settings(step: Step) -> str:
    """What a step is set to where it matters at a glance: a train step's budget (and how it cuts an overlong
    example, where not the default), a merge's options, an MoE's experts and routing (and a LoRA-MoE's router dtype
    and init, where not the default)."""
    params = step.params
    if step.kind == "train":
        training = params["training"]
        budget = f"max_steps {training['max_steps']}" if training["max_steps"] else f"epochs {training['epochs']:g}"
        return ", ".join([f"{budget}, batch {training['batch_size']}", *_set_later(training, ("overlong",))])
    if step.kind == "merge":
        return ", ".join(f"{name} {value}" for name, value in params["options"].items() if name != "seed")
    if step.kind == "moe":
        options = params["options"]
        return ", ".join([f"{len(params['models'])} {params['experts']} experts, top-{options['top_k']}, "
                          f"router {options['router']}", *_set_later(options, ("router_dtype", "router_init"))])
    if step.kind == "statistics":
        return f"{params['kind']}, {params['examples']} examples"
    return ""


def _set_later(params: dict, names: tuple[str, ...]) -> list[str]:
    # settings added later are in a step's params only where set to other than their default (builder.LATER_SETTINGS,
    # methods/moe.py), so the ones present are the ones to show: a default study's table stays as it was
    return [f"{name} {params[name]}" for name in names if name in params]


def describe_resources(plan: Plan, console: Console, gpu_memory: int | None = None) -> None:
    """Per step: estimated memory on one GPU (unsharded) and the GPUs it needs (study/resources.py)."""
    from knowstack.study.resources import DEFAULT_GPU_MEMORY, GiB, estimate_plan

    gpu_memory = gpu_memory or DEFAULT_GPU_MEMORY
    estimates, source = estimate_plan(plan, gpu_memory)
    console.print(f"model: {source}")
    if not estimates:
        console.print("no memory estimate: the model's architecture is unknown")
        return
    table = Table(title=f"estimated memory per step, GiB (GPUs of {gpu_memory / GiB:g} GiB; "
                        "weights+grads+optimizer sharded over the GPUs, activations not)")
    for column in ("#", "step", "what", "params", "weights", "grads", "optimizer", "activations", "total", "GPUs",
                   "as launched"):
        table.add_column(column, justify="left" if column in ("step", "what") else "right")
    too_big = 0
    for index, (step, est) in enumerate(estimates, start=1):
        cells, fits = _resource_row(step, est, plan.config, gpu_memory)
        too_big += not fits
        table.add_row(str(index), *cells)
    # wide enough for every column even where stderr is not a terminal (80 columns by default)
    Console(file=console.file, width=max(console.width, 150)).print(table)
    console.print("GPUs: the fewest GPUs that hold the step with weights, gradients and optimizer state sharded "
                  "(FSDP full shard / ZeRO-3); as launched: processes x GiB per GPU under the config's launch section")
    if too_big:
        console.print(f"[red]{too_big} train steps do not fit as launched[/red]: raise launch.num_processes, use "
                      "the fsdp or deepspeed-zero3 config, or lower training.micro_batch_size / max_length")


def _resource_row(step: Step, est: Estimate, config: StudyConfig, gpu_memory: int) -> tuple[list[str], bool]:
    """One step's cells of the dry run's memory table, and whether it fits as launched."""
    from knowstack.study.resources import USABLE, as_launched, gib

    launched = as_launched(step, est, config)
    fits = launched is None or launched[1] <= gpu_memory * USABLE
    as_run = "" if launched is None else f"{launched[0]} x {gib(launched[1])}" + ("" if fits else " [red]too big[/red]")
    params = f"{est.params / 1e9:.2f}B" if est.params >= 1e8 else f"{est.params / 1e6:.2f}M"
    sizes = [gib(v) for v in (est.weights, est.grads, est.optimizer, est.activations, est.total)]
    gpus = {0: "CPU", -1: "too big"}.get(est.gpus, str(est.gpus))
    return [step.label, est.what, params, *sizes, gpus, as_run], fits


def write_results(plan: Plan, out: Path) -> list[Row]:
    """results.csv, results.sqlite, the per-item scores and costs.csv of every finished evaluation, and study.json
    (what the report reads of the plan); returns the rows."""
    rows = collect_rows(plan, out / "artifacts")
    write_csv(rows, out / "results.csv")
    costs = collect_costs(plan, out / "artifacts")
    write_sqlite(rows, out / "results.sqlite", costs)
    write_items(collect_items(plan, out / "artifacts"), out / PER_EXAMPLE)
    write_costs_csv(costs, out / COSTS_CSV)
    info = study_info(plan, out / "artifacts")
    write_study_info(info, out / STUDY_INFO)
    if info.searches:  # each trial of a search as a row, with its point
        write_search_csv(info.searches, out / SEARCH_CSV)
    return rows


def run_study(config: StudyConfig, out: Path, *, dry_run: bool = False, console: Console | None = None,
              config_text: str | None = None, executor: Executor | None = None,
              gpu_memory: int | None = None, shared_cache: bool | None = None) -> StudyOutcome | None:
    """executor: where the steps run (default: here, in plan order); gpu_memory: bytes per GPU for
    the dry run's estimate of how many GPUs each step needs; shared_cache: link and publish steps in the shared step
    cache (None: the config's executor.shared_cache)."""
    console = console or Console(stderr=True, soft_wrap=True)
    out = Path(out)
    # Every input the steps will read, checked before the plan reads any of them and before the first
    # step runs (or the out dir is made): a bad task file is found now, not hours into the study.
    raise_problems(check_study(config, dry_run=dry_run) + ([] if dry_run else check_study_out(out)))
    if dry_run:
        dry = dry_plan(config, out, shared_cache)
        plan = dry.plan
        describe_plan(dry, out, console)
        if plan.world_pending:
            console.print("the built-in world is not built yet: the keys of the steps after it include its "
                          "fingerprint, known once it is built, so they are provisional here")
        describe_resources(plan, console, gpu_memory)
        return None
    plan = build_plan(config, out)
    from knowstack.train.tracking import check_trackers

    check_trackers(config.training.report_to)  # before any step: a tracker not installed is the user's to fix
    executor = executor or LocalExecutor()
    with study_lock(out):
        if config_text is not None:
            atomic_write_text(out / "config.yaml", config_text)
        started = time.monotonic()
        reuse = StudyReuse(config.executor.shared_cache if shared_cache is None else shared_cache,
                           out / "artifacts", console)
        plan = _link_shared(reuse, plan, config, out)
        world_built = 0
        if plan.world_pending:  # the world first: its fingerprint is part of every later step's key
            world_step = next(step for step in plan.ordered() if step.kind == "world")
            # counted among the study's steps: "step 1/38 world", then "step 2/38"
            world_built = executor.run([world_step], context_for(plan, out, reuse.cache_for(plan)), console,
                                       total=len(plan.steps)).ran
            plan = _link_shared(reuse, build_plan(config, out), config, out)
        atomic_write_json(out / "plan.json", [{"key": s.key, "kind": s.kind, "deps": s.deps} for s in plan.ordered()])
        ctx = context_for(plan, out, reuse.cache_for(plan))
        progress = executor.run(plan.ordered(), ctx, console)
        # the world, built first, is counted once, as run
        ran, skipped, reused = reuse.counts(progress.ran + world_built, progress.skipped - world_built)
        rows = write_results(plan, out)
        console.print(
            f"study '{config.name}': {ran} steps run, {skipped} already done{reuse.summary(reused)}, "
            f"{time.monotonic() - started:.0f} s", soft_wrap=True
        )
    return StudyOutcome(out, out / "results.csv", plan, rows, ran, skipped, reused)


def _link_shared(reuse: StudyReuse, plan: Plan, config: StudyConfig, out: Path) -> Plan:
    """The plan once the cache's steps are linked in: planned again where that built the world, whose fingerprint
    keys the steps after it, and those linked too."""
    pending = plan.world_pending
    reuse.link(plan)
    if pending and reuse.enabled:
        plan = build_plan(config, out)
        if not plan.world_pending:
            reuse.link(plan)
    return plan
