"""Where a study's steps run: here, one after another (local), or as Ray tasks across machines (ray).

Both executors run the same `steps.execute`, which writes a step's artifact to a temporary dir and
renames it when complete, so caching and resume are the same whatever runs the steps: a finished
step (its artifact dir exists) is never redone, and a step cut off (its process killed) leaves only
a temporary dir, removed when the step is tried again.

The Ray executor runs each step whose dependencies are done as a task with the resources it needs
(`study/resources.py`: GPUs for launched training, memory), as many at once as the cluster holds.
Its study dir must be a path every node sees (a shared file system). A task whose worker dies is
retried by Ray (max_retries); an error in a step's own code is not retried and stops the study.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

from rich.console import Console

from knowstack.errors import KnowstackError, os_fault
from knowstack.study.plan import Step
from knowstack.study.steps import StudyContext, base_group_key, evaluate_on_one_base, execute, shares_base

EXECUTOR_NAMES = ("local", "ray")


@dataclass
class Progress:
    ran: int = 0
    skipped: int = 0


class Executor(Protocol):
    """Runs every step of a plan that is not done yet, each after the steps it depends on."""

    def run(self, steps: Sequence[Step], ctx: StudyContext, console: Console, total: int | None = None) -> Progress:
        """total: the study's number of steps where `steps` are a part of them (its world, built first)."""


def clear_stale(step: Step, ctx: StudyContext) -> None:
    """Remove what an earlier, killed attempt at this step left: its temporary dirs (never the artifact).
    Safe because no two attempts at one step run at once (one runner per study dir, and Ray retries a
    task only once its worker is gone)."""
    for leftover in ctx.artifacts.glob(f".{step.key}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def is_done(step: Step, ctx: StudyContext) -> bool:
    return ctx.artifact(step.key).is_dir()


class LocalExecutor:
    """The steps on this machine. jobs 1: in plan order, in this process, on every core. jobs > 1 (executor.jobs,
    "auto": one per core): each step whose dependencies are done runs in one of `jobs` worker processes, on
    executor.threads threads (threads_per_step); a step too large to share the machine (resources.shares_cores)
    waits for the running ones and runs alone, on the threads jobs 1 gives it. jobs None: the config's executor.jobs."""

    name = "local"

    def __init__(self, jobs: int | None = None, threads: int | str | None = None):
        self.jobs, self.threads = jobs, threads

    def run(self, steps: Sequence[Step], ctx: StudyContext, console: Console, total: int | None = None) -> Progress:
        from knowstack.study.progress import StudyProgress, step_sizes

        estimates = _estimates_or_none(ctx)
        jobs = self.jobs or resolve_jobs(ctx.config.executor.jobs)
        with StudyProgress(steps, console, step_sizes(steps, estimates), jobs, total) as shown:
            if jobs > 1 and _steps_to_share(steps, ctx, estimates) > 1:
                threads = ctx.config.executor.threads if self.threads is None else self.threads
                return run_concurrently(steps, ctx, shown, jobs, estimates, threads)
            return run_in_order(steps, ctx, shown)


def _steps_to_share(steps: Sequence[Step], ctx: StudyContext, estimates: dict[str, Any]) -> int:
    """How many steps still to run could run beside others: with fewer than 2, they run one by one, here."""
    from knowstack.study.resources import shares_cores

    return sum(not is_done(step, ctx) and shares_cores(step, ctx.config, estimates.get(step.key)) for step in steps)


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_jobs(jobs: int | str) -> int:
    return machine_cores() if jobs == "auto" else int(jobs)


def parse_threads(threads: int | str | None) -> int | str | None:
    """--threads as given: share, all or a count of 1 or more (None: the config's)."""
    if threads is None or threads in ("share", "all"):
        return threads
    if str(threads).isdigit() and int(threads) >= 1:
        return int(threads)
    raise KnowstackError(f"--threads must be share, all or a number of 1 or more, not '{threads}'")


def threads_per_step(threads: int | str, cores: int, jobs: int) -> int:
    """Torch threads of a step that runs beside others: executor.threads resolved on this machine ("all": torch's own
    count in this process, the one a step of jobs 1 runs on; it may be the physical cores, fewer than `cores`)."""
    if threads == "all":
        import torch

        return torch.get_num_threads()
    if threads == "share":
        return max(1, cores // jobs)
    return int(threads)


@contextlib.contextmanager
def waiting_threads_sleep(oversubscribed: bool) -> Iterator[None]:
    """Workers started meanwhile wait for work asleep (OMP_WAIT_POLICY=PASSIVE, unless the user set it) when the
    jobs' threads outnumber the cores: OpenMP's default spinning would burn the turn of the thread it waits for
    (measured: 2 processes of 2 threads on 2 cores, each 4.6x slower than alone when spinning, 1.8x when asleep)."""
    if not oversubscribed or "OMP_WAIT_POLICY" in os.environ:
        yield
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        yield
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)


def run_in_order(steps: Sequence[Step], ctx: StudyContext, shown: Any) -> Progress:
    """Each step in plan order; evaluations of adapters of one base wait for the last of them and run together on
    the base loaded once (one_base_groups)."""
    progress = Progress()
    groups = one_base_groups(steps, ctx)
    index = {step.key: i for i, step in enumerate(steps, start=1)}
    for position, step in enumerate(steps, start=1):
        if is_done(step, ctx):
            progress.skipped += 1
            shown.skip(step)
            continue
        group = groups.get(step.key)
        if group is not None:
            if step is group[-1]:
                progress.ran += run_group([s for s in group if not is_done(s, ctx)], ctx, shown, index)
            continue
        shown.start(step, position)
        clear_stale(step, ctx)
        execute(step, ctx)
        progress.ran += 1
        shown.finish(step)
    return progress


def one_base_groups(steps: Sequence[Step], ctx: StudyContext) -> dict[str, list[Step]]:
    """Evaluation steps still to run that share a base (steps.base_group_key), two or more, by each member's key:
    run where the last of them is in plan order (an evaluation is no step's input, so waiting delays nothing)."""
    inputs = {dep for step in steps for dep in step.deps}
    by_base: dict[tuple, list[Step]] = {}
    for step in steps:
        key = base_group_key(step)
        if key is not None and step.key not in inputs and not is_done(step, ctx):
            by_base.setdefault(key, []).append(step)
    return {step.key: group for group in by_base.values() if len(group) > 1 for step in group}


def run_group(group: list[Step], ctx: StudyContext, shown: Any, index: dict[str, int]) -> int:
    """The group's steps, each done on its own (a kill loses the one in progress): those whose adapter can be
    merged into the loaded base and taken out again on one base, the others loaded alone."""
    alone = [step for step in group if not shares_base(step, ctx)]
    for step in group:
        clear_stale(step, ctx)
    shared = [step for step in group if step not in alone]
    ran = evaluate_on_one_base(shared, ctx, lambda step: shown.start(step, index[step.key]), shown.finish) \
        if shared else 0
    for step in alone:
        shown.start(step, index[step.key])
        execute(step, ctx)
        shown.finish(step)
    return ran + len(alone)


def run_concurrently(steps: Sequence[Step], ctx: StudyContext, shown: Any, jobs: int,
                     estimates: dict[str, Any], threads: int | str = "share") -> Progress:
    """Ready steps in plan order, up to `jobs` at once in worker processes; a step that cannot share the cores
    starts only when none runs, and none starts beside it. The first step to fail stops the study: the steps
    running then are finished (their artifacts are complete), none is started, and the error is raised."""
    from knowstack.study.resources import shares_cores

    cores = machine_cores()
    share = threads_per_step(threads, cores, jobs)
    alone = threads_per_step("all", cores, jobs)  # a step alone runs as jobs 1 runs it
    progress = Progress()
    done = set()
    for step in steps:
        if is_done(step, ctx):
            done.add(step.key)
            progress.skipped += 1
            shown.skip(step)
    waiting = [step for step in steps if step.key not in done]
    index = {step.key: i for i, step in enumerate(steps, start=1)}
    running: dict[Future[StepOutcome], tuple[Step, bool]] = {}
    spawn = multiprocessing.get_context("spawn")  # fork would copy this process's threads and torch state
    with waiting_threads_sleep(share * jobs > cores), \
            ProcessPoolExecutor(max_workers=jobs, mp_context=spawn, initializer=_init_worker) as pool:
        while waiting or running:
            for step in [s for s in waiting if all(dep in done for dep in s.deps)]:
                shared = shares_cores(step, ctx.config, estimates.get(step.key))
                alone_running = any(not beside for _, beside in running.values())
                if len(running) >= jobs or alone_running or (not shared and running):
                    break  # plan order: a step that needs the whole machine is not overtaken
                shown.start(step, index[step.key])
                running[pool.submit(run_step_task_reporting, step, ctx, share if shared else alone)] = (step, shared)
                waiting.remove(step)
            if not running:
                raise KnowstackError(f"steps wait on steps that are not in the plan: {[s.key for s in waiting]}")
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            failures = []
            for future in finished:
                step, _ = running.pop(future)
                outcome = future.result()
                if outcome.error is not None:
                    failures.append((step, outcome))
                    continue
                done.add(step.key)
                progress.ran += 1
                shown.finish(step)
            if failures:
                wait(list(running))  # let the others complete: their artifacts are then whole
                step, outcome = failures[0]
                raise outcome.exception(step)
    return progress


class StepFailed(RuntimeError):
    """A step's own code failed in a worker process: its traceback there, as the message."""

    def __init__(self, key: str, trace: str):
        super().__init__(f"step {key} failed:\n{trace}")


@dataclass
class StepOutcome:
    seconds: float
    error: str | None = None
    knowstack: bool = False  # the error is a KnowstackError (the user's to fix), not a bug
    fault: tuple[int, str, str | None] | None = None  # a fault of the machine (errors.os_fault): errno, text, file

    def exception(self, step: Step) -> Exception:
        """The error to raise in the study's process, as the step would have raised it there."""
        if self.fault is not None:
            return OSError(*self.fault)
        return KnowstackError(self.error or "") if self.knowstack else StepFailed(step.key, self.error or "")


def run_step_task_reporting(step: Step, ctx: StudyContext, threads: int) -> StepOutcome:
    """A worker process's task: the step on `threads` threads; its error as text (a traceback does not pickle)."""
    started = time.monotonic()
    try:
        run_step_task(step, ctx, threads)
    except KnowstackError as err:
        return StepOutcome(time.monotonic() - started, str(err), knowstack=True)
    except Exception as err:
        fault = os_fault(err)  # a full disk, a read-only dir: one line in the study's process, not a traceback
        if fault is not None:
            return StepOutcome(time.monotonic() - started, str(fault),
                               fault=(fault.errno or 0, fault.strerror or str(fault), fault.filename))
        return StepOutcome(time.monotonic() - started, traceback.format_exc())
    return StepOutcome(time.monotonic() - started)


def _init_worker() -> None:
    """A worker dies with the study's process (a killed study must leave no step running that its resumption would
    start again), and steps' own bars (training steps) stay out of the study's display, which shows the steps."""
    from knowstack import progress as bars

    _die_with_parent()

    bars.set_sink(_SilentBar)
    os.environ["TQDM_DISABLE"] = "1"  # pretraining's and libraries' own tqdm bars


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class _SilentBar:
    def __init__(self, iterable: Any, desc: str):
        self.iterable = iterable

    def __iter__(self) -> Any:
        return iter(self.iterable)

    def set_postfix(self, **values: Any) -> None:
        pass


def _estimates_or_none(ctx: StudyContext) -> dict[str, Any]:
    """The dry run's per-step estimates, for the time left; none where the model's shape is unknown."""
    try:
        return estimate_plan_by_key(ctx)
    except Exception:  # an estimate is a nicety: a study runs without one
        return {}


def run_step_task(step: Step, ctx: StudyContext, threads: int) -> float:
    """The body of one Ray task: the step, exactly as the local executor runs it."""
    import torch

    # As many threads as CPUs the task holds: Ray packs tasks by their CPU count.
    torch.set_num_threads(max(1, threads))
    started = time.monotonic()
    clear_stale(step, ctx)
    execute(step, ctx)
    return time.monotonic() - started


class RayExecutor:
    """Every ready step as a Ray task. address: a running cluster ('auto', 'ray://host:10001',
    'host:6379'); None starts a local Ray on this machine. If Ray is already initialised in this
    process (e.g. by a test), that instance is used."""

    name = "ray"

    def __init__(self, address: str | None = None, *, max_retries: int = 3, init_kwargs: dict[str, Any] | None = None):
        self.address = address
        self.max_retries = max_retries
        self.init_kwargs = init_kwargs or {}

    def run(self, steps: Sequence[Step], ctx: StudyContext, console: Console, total: int | None = None) -> Progress:
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, **self.init_kwargs)
        try:
            return self._schedule(ray, steps, ctx, console, total or len(steps))
        finally:
            if started_here:
                ray.shutdown()

    def _schedule(self, ray: Any, steps: Sequence[Step], ctx: StudyContext, console: Console, total: int) -> Progress:
        from knowstack.study.resources import step_resources

        progress = Progress()
        done = {step.key for step in steps if is_done(step, ctx)}
        progress.skipped = len(done)
        waiting = [step for step in steps if step.key not in done]
        cluster = cluster_resources(ray)
        estimates = dict(estimate_plan_by_key(ctx))
        remote = ray.remote(run_step_task)
        running: dict[Any, Step] = {}
        while waiting or running:
            for step in [s for s in waiting if all(dep in done for dep in s.deps)]:
                options = step_resources(step, ctx.config, estimates.get(step.key)).ray_options(cluster, step.label)
                ref = remote.options(max_retries=self.max_retries, retry_exceptions=False,
                                     name=f"knowstack:{step.kind}:{step.label}", **options
                                     ).remote(step, ctx, int(options["num_cpus"]))
                running[ref] = step
                waiting.remove(step)
                console.print(f"[bold]submitted[/bold] {step.kind}: {step.shown} ({_describe(options)})")
            if not running:
                raise KnowstackError(f"steps wait on steps that are not in the plan: {[s.key for s in waiting]}")
            finished, _ = ray.wait(list(running), num_returns=1)
            for ref in finished:
                step = running.pop(ref)
                seconds = self._result(ray, ref, step, running)
                done.add(step.key)
                progress.ran += 1
                console.print(f"  done {step.kind}: {step.shown} in {seconds:.1f} s "
                              f"({len(done) + total - len(steps)}/{total} steps)")
        return progress

    @staticmethod
    def _result(ray: Any, ref: Any, step: Step, running: dict[Any, Step]) -> float:
        """The task's seconds; on failure the other running tasks are cancelled and the step's error raised."""
        try:
            return float(ray.get(ref))
        except Exception as err:
            for other in running:
                ray.cancel(other, force=True)
            cause = getattr(err, "cause", None)
            if isinstance(cause, KnowstackError):
                raise cause from None
            raise KnowstackError(f"step {step.key} failed on Ray: {err}") from err


def cluster_resources(ray: Any) -> dict[str, float]:
    cluster = dict(ray.cluster_resources())
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    cluster["max_node_memory"] = max((node["Resources"].get("memory", 0) for node in nodes), default=0)
    return cluster


def estimate_plan_by_key(ctx: StudyContext) -> dict[str, Any]:
    """Each step's memory estimate (study/resources.py), for its task's memory request."""
    from knowstack.study.plan import build_plan
    from knowstack.study.resources import estimate_plan

    estimates, _ = estimate_plan(build_plan(ctx.config, ctx.out))
    return {step.key: estimate for step, estimate in estimates}


def _describe(options: dict[str, Any]) -> str:
    parts = [f"{options['num_cpus']:g} CPU"]
    if options.get("num_gpus"):
        parts.append(f"{options['num_gpus']:g} GPU")
    if options.get("memory"):
        parts.append(f"{options['memory'] / 2**30:.1f} GiB")
    return ", ".join(parts)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise KnowstackError("the Ray executor needs Ray: pip install 'knowstack[ray]'") from None
    return ray


def make_executor(name: str, address: str | None = None, jobs: int | None = None,
                  threads: int | str | None = None) -> Executor:
    """jobs, threads: the local executor's steps at once and threads of each (None: the config's executor section)."""
    if jobs is not None and jobs < 1:
        raise KnowstackError(f"--jobs must be 1 or more, not {jobs}")
    threads = parse_threads(threads)
    if name == "local":
        if address is not None:
            raise KnowstackError("--address is for the ray executor")
        return LocalExecutor(jobs, threads)
    if jobs is not None or threads is not None:
        raise KnowstackError(f"--{'jobs' if jobs is not None else 'threads'} is for the local executor")
    if name == "ray":
        import_ray()
        return RayExecutor(address)
    raise KnowstackError(f"unknown executor '{name}': choose one of {', '.join(EXECUTOR_NAMES)}")
