"""`knowstack compose`: the next version of the shared model, built from contributions by one method,
measured on every registered task and on old knowledge, and released only if the forgetting gate passes.

    compose("reg", "moe-lora")                                  # every contribution, MoE of LoRA adapters
    compose("reg", "merge-ties", contributions=["stance", "code"], gate_old=2.0, gate_task=10.0)

Methods that combine weights (merge-*, moe-*) use what contributors handed in; methods that train
(sequential, olora, replay, joint) use their training data, so they are open only for contributions
registered with --keep-data: the paper's semi- vs fully-cooperative settings.

A compose works in `REG/.compose/<key>/`, keyed by the method, its settings and the exact inputs: each
finished piece (the built model, each training round, each task's score) is kept there as it is done,
so a compose that is killed resumes where it stopped when run again; the version's record is one
transaction at the very end, so there is never a half version. The work dir is removed once recorded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowstack.atomic import atomic_write_json, atomic_write_text
from knowstack.config import EVAL_BATCH_SIZE
from knowstack.errors import KnowstackError
from knowstack.hashing import content_hash
from knowstack.registry import db
from knowstack.registry.compose_inputs import Build, ComposeOptions
from knowstack.registry.core import (
    BASE_NAME,
    STATISTICS,
    Registry,
    ancestor_contributions,
    check_name,
    composed,
)
from knowstack.registry.db import DEFAULT_PROTOCOL
from knowstack.registry.evaluate import (
    RegisteredTask,
    item_scores,
    new_scores,
    old_average,
    registered_tasks,
    score_model,
    stored_old_knowledge,
    task_of,
    without_items,
)
from knowstack.registry.gate import Released, gate_checks, gate_record
from knowstack.study.methods import ComposeVariant, compose_variants

if TYPE_CHECKING:
    from knowstack.train.launch import LaunchSpec

WORK_DIR = ".compose"
VIEWS_DIR = "views"
STATISTICS_DIR = "statistics"  # the inputs' contributed statistics, laid out
EVAL_DIR = "eval"  # the study dir the version and the base are scored in (registry/evaluate.py score_model)
EVAL_TASKS_DIR = "eval-tasks"  # the registered tasks' stored splits, laid out for it
OLD_DIR = "old-knowledge"  # the base's stored old-knowledge task files, laid out for it


@dataclass(frozen=True)
class Method:
    """A registry compose method: a variant of one method of the study's catalog (study/methods/), built by running
    that method's plan on the contributions (registry/compose_plan.py)."""

    name: str
    needs_data: bool
    kinds: tuple[str, ...]  # contribution kinds it combines (weight methods); () for training methods
    knobs: tuple[str, ...]
    build: Callable[[Build], None]
    summary: str = field(default="")
    catalog: str = ""  # the catalog method it runs
    keyed_when_set: tuple[str, ...] = ()  # knobs recorded (and keyed) only when not their default (ComposeVariant's)

    def settings(self, options: ComposeOptions) -> dict[str, Any]:
        default = ComposeOptions()
        return {knob: getattr(options, knob) for knob in self.knobs
                if knob not in self.keyed_when_set or getattr(options, knob) != getattr(default, knob)}

    @property
    def statistics(self) -> str | None:
        """The kind of the contributions' statistics it reads (merge-regmean: gram, merge-fisher: fisher)."""
        from knowstack.combine.merges import METHODS as MERGES

        merge = MERGES.get(self.name.removeprefix("merge-")) if self.catalog == "merge" else None
        return merge.statistics if merge is not None else None


def _catalog_build(catalog: str, variant: ComposeVariant) -> Callable[[Build], None]:
    def build(b: Build) -> None:
        from knowstack.registry.compose_plan import run_compose_plan

        run_compose_plan(b, catalog, variant)
    return build


METHODS: dict[str, Method] = {
    name: Method(name, variant.needs_data, variant.kinds, variant.knobs, _catalog_build(method.name, variant),
                 variant.summary, method.name, variant.keyed_when_set)
    for name, (method, variant) in compose_variants().items()
}


# --- choosing and checking the inputs -----------------------------------------------------------------
def choose_contributions(records: Sequence[dict[str, Any]], names: Sequence[str] | None,
                         method: Method) -> list[dict[str, Any]]:
    """The named contributions, in the order named; by default every contribution the method can combine
    (a MoE of adapters leaves full models out), in the order contributed."""
    contributions = {r["name"]: r for r in records if r["method"] == "contribution"}
    if names is None:
        usable = [r for r in contributions.values() if method.needs_data or r["kind"] in method.kinds]
        if not usable:
            what = f"{' or '.join(method.kinds)} contributions" if contributions else "contributions"
            raise KnowstackError(f"this registry has no {what} yet for '{method.name}': add some with "
                                 "`knowstack contribute`", field="contributions")
        return usable
    if len(set(names)) != len(names):
        raise KnowstackError("a contribution is named twice", field="contributions")
    known = {r["name"] for r in records}
    for name in names:
        if name not in contributions:
            what = "is a composed version, not a contribution" if name in known else "is not in this registry"
            raise KnowstackError(f"'{name}' {what}", field="contributions")
    if not names:
        raise KnowstackError("give at least one contribution", field="contributions")
    return [contributions[name] for name in names]


def check_inputs(method: Method, chosen: Sequence[dict[str, Any]], options: ComposeOptions) -> None:
    """One clear error, naming the contributions and the reason, for every input the method cannot use."""
    without = [r["name"] for r in chosen if not r["keep_data"]]
    if method.needs_data:
        if without:
            raise KnowstackError(f"'{method.name}' trains on the contributions' data, and {', '.join(without)} "
                                 "were registered without it (--keep-data): use a merge or MoE method, or "
                                 "leave them out with --contributions", field="method")
        if method.name == "olora" and options.finetune != "lora":
            raise KnowstackError("O-LoRA trains LoRA adapters: it needs --finetune lora", field="finetune")
        return
    wrong = [f"{r['name']} ({r['kind']})" for r in chosen if r["kind"] not in method.kinds]
    if wrong:
        raise KnowstackError(f"'{method.name}' combines {' or '.join(method.kinds)} contributions, not "
                             f"{', '.join(wrong)}", field="contributions")
    if method.statistics is not None:
        lacking = [r["name"] for r in chosen if method.statistics not in _statistics_kinds(r)]
        if lacking:
            raise KnowstackError(f"'{method.name}' reads each contribution's {method.statistics} statistics, and "
                                 f"{', '.join(lacking)} were contributed without them (contribute --statistics DIR, "
                                 "made by `knowstack statistics`)", field="contributions")
    if method.catalog == "moe":
        check_moe_options(method, options)
    if method.name.startswith("moe") and options.router_steps > 0 and without:
        raise KnowstackError(f"router training trains on the contributions' data, and {', '.join(without)} were "
                             "registered without it (--keep-data): use --router-steps 0", field="router_steps")
    if method.name.startswith("moe") and options.router == "gates":
        from knowstack.modeling.routing import GATES_FILE

        ungated = [r["name"] for r in chosen if GATES_FILE not in (r.get("files") or {})]
        if ungated:
            raise KnowstackError(f"the gates router needs each contribution's gates, and {', '.join(ungated)} were "
                                 "contributed without (train them with `knowstack gate` before contributing)",
                                 field="router")
    if method.name.startswith("moe") and options.router in ("prompts", "hidden", "cheap-embed"):  # from prompts
        promptless = [r["name"] for r in chosen if not {"eval", "train"} & set(r["task_files"])]
        if promptless:
            raise KnowstackError(f"routers from prompts need an eval split (or kept training data) for "
                                 f"'{promptless[0]}': contribute its task with eval.json, or use --router uniform|random",
                                 field="router")


# moe_problems' settings by the compose option that gives them (the rest are compose's own names; the CLI words each
# as its option: router_init, --router-init)
MOE_OPTION_OF = {"router_training": "router_steps"}


def check_moe_options(method: Method, options: ComposeOptions) -> None:
    """The MoE options against the rules of a mixture (config.py moe_problems, the one check of each rule), before the
    work dir is made: the first broken one, naming its option."""
    from knowstack.config import MoeConfig, moe_problems

    kinds = {"lora" if kind == "adapter" else "fft" for kind in method.kinds}
    moe = MoeConfig()  # the settings a compose does not give
    problems = moe_problems(kinds, router=options.router, base_expert=moe.base_expert, attention=False,
                            routing=moe.routing, trains=options.router_steps > 0, temperature=False,
                            router_dtype=options.router_dtype, router_init=options.router_init)
    if problems:
        setting, message = problems[0]
        raise KnowstackError(message, field=MOE_OPTION_OF.get(setting, setting))


def check_combinable(b: Build, method: Method) -> None:
    """The weights the method reads (the contributions a merge or MoE combines, and the --from version) checked against
    the registry's base before anything is built (combine/compatibility.py; contributions were checked when they were
    contributed, so this finds those of a registry made before a check existed). On a difference the work dir, which
    then holds only the inputs' views, is removed, and the error lists every input's first difference."""
    from knowstack.combine.compatibility import check_compatible
    from knowstack.combine.inputs import FullModel, open_input

    weights = [] if method.needs_data else list(b.inputs)
    if b.start is not None:
        weights.append(b.start)
    try:
        check_compatible(FullModel(b.base_dir), [open_input(path) for path in weights], name="the registry's base")
    except KnowstackError:
        shutil.rmtree(b.work, ignore_errors=True)
        raise


def _statistics_kinds(record: dict[str, Any]) -> set[str]:
    """The kinds of statistics a contribution was contributed with (its statistics files, by name)."""
    from knowstack.combine.statistics import KINDS

    files = record["settings"].get(STATISTICS) or {}
    return {kind for kind in KINDS if f"{kind}.safetensors" in files}


def check_start(records: Sequence[dict[str, Any]], name: str, method: Method) -> dict[str, Any]:
    """The version --from names, if a method can build on it: a released model, or a released plain LoRA adapter."""
    record = next((r for r in records if r["name"] == name), None)
    if record is None:
        raise KnowstackError(f"no version named '{name}' in this registry", field="from")
    if method.statistics is not None:
        raise KnowstackError(f"'{method.name}' reads each input's statistics of its data, which a composed version "
                             "has not: compose it from contributions alone", field="from")
    if method.name.startswith("moe"):
        raise KnowstackError("an MoE is built from contributions on the base: --from is for merges and training",
                             field="from")
    if record["kind"] == "base":
        raise KnowstackError("--from base is what compose does without --from", field="from")
    if record["status"] != "released":
        raise KnowstackError(f"'{name}' was rejected by the gate: build on a released version", field="from")
    if "lora_moe.json" in record["files"]:
        raise KnowstackError(f"'{name}' is a LoRA-MoE: it cannot be merged or trained further", field="from")
    return record


def compose_key(method: Method, settings: dict[str, Any], base_hash: str, chosen: Sequence[dict[str, Any]],
                start: dict[str, Any] | None = None) -> str:
    """What decides the result: method, settings, base, the version built upon and each input's content (and,
    for training, its data)."""
    inputs = [{"name": r["name"], "content": r["content_hash"], "task_files": r["task_files"],
               # the statistics a method reads are an input too (only then: every other key stays what it was)
               **({"statistics": r["settings"].get(STATISTICS)} if method.statistics else {})} for r in chosen]
    text = json.dumps({"method": method.name, "settings": settings, "base": base_hash, "inputs": inputs,
                       **({"from": start["content_hash"]} if start else {})}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def next_version_name(records: Sequence[dict[str, Any]]) -> str:
    taken = {r["name"] for r in records}
    number = 1 + len(composed(records))
    while f"v{number}" in taken:
        number += 1
    return f"v{number}"


# --- the shared model's line, for the gate ---------------------------------------------------------------
def released_line(records: Sequence[dict[str, Any]], tasks: dict[str, RegisteredTask],
                  base_items: dict[str, list[float]] | None = None) -> list[Released]:
    """The base, then every released composed version, oldest first, with the per-item scores each kept (the
    base's: `base_items` where given)."""
    line = [r for r in records if r["kind"] == "base"] + [r for r in composed(records) if r["status"] == "released"]
    return [Released(r["name"], old_average(r["scores"]), new_scores(r["scores"], tasks),
                     {**r["settings"].get(ITEMS, {}), **((base_items or {}) if r["kind"] == "base" else {})})
            for r in line]


ITEMS = "item_scores"  # a version's settings key: its per-item scores, {"old/<task>" | "new/<task>": [...]}
BASE_ITEMS_DIR = "item-scores"  # the local cache of the base's per-item scores on registered tasks


def _base_items(b: Build, tasks: dict[str, RegisteredTask], batch_size: int) -> dict[str, list[float]]:
    """The base's score on every registered task it was not scored on yet (the gate's first reference), and its
    per-item scores on them and on old knowledge: the ones its record kept (old knowledge, from init), else
    measured on the stored items once and kept in this machine's cache (the same model on the same stored items
    gives the same scores)."""
    reg = b.reg
    base = reg.base()
    cache = reg.work_dir / BASE_ITEMS_DIR / _items_cache_name(base["content_hash"], reg.protocol)
    items = {**(json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}),
             **base["settings"].get(ITEMS, {})}
    recorded = new_scores(base["scores"], tasks)
    missing = [task for name, task in tasks.items() if name not in recorded or f"new/{name}" not in items]
    old_tasks = (base["settings"].get("old_knowledge") or {}).get("tasks") or []
    old_missing = any(f"old/{task}" not in items for task in old_tasks)
    if not missing and not old_missing:
        return items
    if missing:
        b.say(f"scoring the base on {', '.join(task.name for task in missing)}")
    if old_missing:
        b.say("scoring the base's old knowledge item by item (for the gate's intervals)")
    rows = _score(b, b.base_dir, None, missing, old_missing, batch_size)
    unrecorded = [row for row in rows if row["kind"] == "new" and row["task"] not in recorded]
    if unrecorded:
        reg.add_scores(BASE_NAME, without_items(unrecorded))
    items.update(item_scores(rows, tasks))
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, items)
    return items


def _items_cache_name(base_hash: str, protocol: str) -> str:
    # the default protocol's keeps the name it had before registries had protocols
    return f"{base_hash}.json" if protocol == DEFAULT_PROTOCOL else f"{base_hash}-{protocol}.json"


def _score(b: Build, model: Path, adapter: Path | None, tasks: Sequence[RegisteredTask], old: bool,
           batch_size: int) -> list[dict[str, Any]]:
    """Score rows of `model` (+ `adapter`) on `tasks` and, with `old`, the base's old knowledge, by the study's
    evaluation step in the compose's work dir (a killed compose resumes at the next task)."""
    entries = [task.study_task(b.reg.store, b.work / EVAL_TASKS_DIR / task.name) for task in tasks]
    old_knowledge = stored_old_knowledge(b.reg, b.work / OLD_DIR, batch_size) if old else None
    return score_model(b.work / EVAL_DIR, b.base_dir, model, adapter, entries, old_knowledge,
                       protocol=b.reg.protocol, batch_size=batch_size, harness=b.reg.harness)


# --- compose ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _exclusive(work: Path) -> Iterator[None]:
    """One compose of the same inputs at a time; a second one is told, not left to collide."""
    work.parent.mkdir(parents=True, exist_ok=True)
    lock = work.parent / f"{work.name}.lock"
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KnowstackError("another compose of the same inputs and settings is running", path=work) from None
        try:
            yield
        finally:
            # Removed only by its holder, whether the compose succeeded or failed (a failed one keeps its work
            # dir to resume from, not its lock): a compose that finds it gone makes a new one and then sees the
            # version already recorded (the check runs under the lock).
            lock.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _evaluate(b: Build, tasks: dict[str, RegisteredTask], batch_size: int) -> list[dict[str, Any]]:
    """The version's score rows on every registered task and on old knowledge."""
    adapter = built_kind(b.out) == "adapter"
    rows = _score(b, b.base_dir if adapter else b.out, b.out if adapter else None, list(tasks.values()), True,
                  batch_size)
    scored = new_scores(rows, tasks)
    for name, task in tasks.items():
        b.say(f"scored on {name}: {task.score_metric} {scored[name]:.4f}")
    return rows


def built_kind(out: Path) -> str:
    """"model" for a full model dir; "adapter" for what goes on the base (a PEFT adapter, a LoRA-MoE)."""
    return "model" if (out / "config.json").is_file() else "adapter"


def _version_files(out: Path) -> tuple[dict[str, Path], list[str]]:
    """Every file of the built dir, and the ones its content hash covers (configs and weights)."""
    files = {str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if p.is_file()}
    hashed = [name for name in files if name.endswith(".safetensors") or Path(name).name.endswith("config.json")]
    return files, hashed or list(files)


def compose(
    root: str | Path,
    method: str,
    *,
    contributions: Sequence[str] | None = None,
    start: str | None = None,
    name: str | None = None,
    options: ComposeOptions | None = None,
    gate_old: float = 2.0,
    gate_task: float = 10.0,
    gate_task_points: float = 0.0,
    author: str | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    launch: LaunchSpec | None = None,
    force_release: bool = False,
    say: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Build, score, gate and record the next version; returns its record (released or rejected).

    start: a released version to build on (--from): merges take it as one more input, training methods
    begin from it, so a version can be the previous release plus the new contributions. launch: run the
    training (and router training) as `accelerate launch` of N processes; the result does not depend on it,
    so it is not part of the version's key. force_release: release the version even if the gate fails (recorded
    as forced, and said so wherever the version is shown)."""
    if method not in METHODS:
        raise KnowstackError(f"unknown compose method '{method}' (known: {', '.join(METHODS)})", field="method")
    spec, options = METHODS[method], options or ComposeOptions()
    if name is not None:
        check_name(name)
    with Registry.open(root) as reg:
        records = reg.versions()
        chosen = choose_contributions(records, contributions, spec)
        left_out = [r["name"] for r in records if r["method"] == "contribution" and r not in chosen]
        if contributions is None and left_out:
            say(f"left out (not {' or '.join(spec.kinds)}): {', '.join(left_out)}")
        check_inputs(spec, chosen, options)
        if spec.catalog == "search":
            from knowstack.registry.compose_plan import searchable_old_knowledge

            searchable_old_knowledge(reg)
        start_record = check_start(records, start, spec) if start is not None else None
        settings = spec.settings(options)
        key = compose_key(spec, settings, reg.base()["content_hash"], chosen, start_record)
        work = reg.work_dir / WORK_DIR / key
        with _exclusive(work):
            records = reg.versions()
            done = next((r for r in composed(records) if r["settings"].get("compose_key") == key), None)
            if done is not None:
                say(f"already composed as '{done['name']}' ({done['status']}): nothing to do"
                    + (" (a recorded verdict is not changed by --force-release)"
                       if force_release and done["status"] == "rejected" else ""))
                shutil.rmtree(work, ignore_errors=True)
                return done
            version_name = name or next_version_name(records)
            if reg.name_taken(version_name):
                raise KnowstackError(f"the name '{version_name}' is taken in this registry: choose another",
                                     path=reg.where, field="name")
            tasks = registered_tasks(records)
            with contextlib.ExitStack() as stack:
                build = _open_build(stack, reg, records, spec, chosen, start_record, options, work, say, launch)
                if build.out.is_dir():
                    say(f"{method}: built before, kept ({build.out})")
                else:
                    check_combinable(build, spec)
                    say(f"{method}: building from {', '.join(build.names)}"
                        + (f", on {start_record['name']}" if start_record else ""))
                    spec.build(build)
                name_inputs_by_version(build)
                base_items = _base_items(build, tasks, batch_size)
                scores = _evaluate(build, tasks, batch_size)
            parents = ([start_record["name"]] if start_record else []) + [r["name"] for r in chosen]
            new = _gated_version(reg, version_name, spec, settings, key, build.out, scores, tasks, parents,
                                 (gate_old, gate_task, gate_task_points), author, base_items,
                                 start_record["name"] if start_record else None, force_release)
            reg.record(new)
            shutil.rmtree(work, ignore_errors=True)
            return reg.version(version_name)


def name_inputs_by_version(b: Build) -> None:
    """Built files record their inputs' paths (merge.json, moe.json, an adapter's base): here those are temporary
    views. Naming them by version instead keeps a version's bytes a function of its inputs, so composing the
    same thing twice, or in two registries, stores the same objects."""
    names = {str(b.base_dir): BASE_NAME, str(b.work): "."}
    names.update({str(path): name for path, name in zip(b.inputs, b.names, strict=True)})
    names.update({str(path): f"{name}/statistics" for path, name in zip(b.statistics, b.names, strict=True)
                  if path is not None})
    if b.start is not None and b.start_name is not None:
        names[str(b.start)] = b.start_name
    names.update({str(Path(path).resolve()): name for path, name in list(names.items())})

    # the most specific path first: the inputs' views lie inside the work dir
    names = dict(sorted(names.items(), key=lambda item: -len(item[0])))

    def renamed(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: renamed(item) for key, item in value.items()}
        if isinstance(value, list):
            return [renamed(item) for item in value]
        if isinstance(value, str):
            for path, name in names.items():
                if value == path or value.startswith(path + "/"):
                    return name + value[len(path):]
        return value

    for path in sorted(b.out.rglob("*.json")):
        if path.stat().st_size > 1 << 20:  # tokenizer.json and the like: no paths, and costly to rewrite
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        named = renamed(data)
        if named != data:
            atomic_write_json(path, named)
    # Model cards (README.md) name their inputs by path in prose: the same renaming, as text, longest path first.
    for card in sorted(b.out.rglob("README.md")):
        text = card.read_text(encoding="utf-8")
        named_text = text
        for path, name in sorted(names.items(), key=lambda item: -len(item[0])):
            named_text = named_text.replace(path, name)
        if named_text != text:
            atomic_write_text(card, named_text)


def _open_build(stack: contextlib.ExitStack, reg: Registry, records: Sequence[dict[str, Any]], spec: Method,
                chosen: Sequence[dict[str, Any]], start: dict[str, Any] | None, options: ComposeOptions, work: Path,
                say: Callable[[str], None], launch: LaunchSpec | None) -> Build:
    """The base, the inputs and the --from version as verified dirs at paths that stay the same in this work dir
    (the plan's step keys name them, so that a killed compose finds its finished steps again)."""

    def view(name: str) -> Path:
        return reg.store.lay_out(reg.version(name)["files"], work / VIEWS_DIR / name)

    base_dir = view(BASE_NAME)
    inputs = [view(r["name"]) for r in chosen]
    protocol = reg.protocol
    replayed: tuple[RegisteredTask, ...] = ()
    start_dir = None
    if start is not None:
        start_dir = view(start["name"])
        if spec.name == "replay":
            earlier = ancestor_contributions(records, start["name"])
            replayed = tuple(task_of(r, protocol) for r in earlier if r["keep_data"])
            unreplayed = [r["name"] for r in earlier if not r["keep_data"]]
            if unreplayed:
                say(f"not replayed (registered without their data): {', '.join(unreplayed)}")
    statistics = tuple(reg.store.lay_out(r["settings"][STATISTICS], work / STATISTICS_DIR / r["name"])
                       if r["settings"].get(STATISTICS) else None for r in chosen)
    return Build(reg, base_dir, inputs, [r["name"] for r in chosen], [task_of(r, protocol) for r in chosen], options,
                 work, say, start_dir, start is not None and start["kind"] == "adapter", start and start["name"], replayed,
                 launch, statistics)


def _gated_version(reg: Registry, name: str, spec: Method, settings: dict[str, Any], key: str, out: Path,
                   scores: list[dict[str, Any]], tasks: dict[str, RegisteredTask], parents: list[str],
                   limits: tuple[float, float, float], author: str | None,
                   base_items: dict[str, list[float]] | None = None, start: str | None = None,
                   force: bool = False) -> db.NewVersion:
    """The version to record: its files stored, and released or rejected by the gate against what it was built
    from (the base, or the release `start`); force: released even if the gate fails, and recorded as forced."""
    from knowstack.registry.base import store_files

    line = {released.name: released for released in released_line(reg.versions(), tasks, base_items)}
    built_from = line[start or BASE_NAME]  # check_start took a released version
    items = item_scores(scores, tasks)
    checks = gate_checks(old_average(scores), new_scores(scores, tasks), built_from, line[BASE_NAME], *limits,
                         items=items)
    gate = gate_record(checks, *limits, built_from=built_from.name, force=force)
    if old_average(scores) is None:
        gate["note"] = "no old-knowledge tasks registered (registry init --old-tasks): AVE not gated"
    files, hashed = _version_files(out)
    names, sizes = store_files(reg.store, files)
    return db.NewVersion(
        name=name, kind=built_kind(out), method=spec.name, files=names,
        content_hash=content_hash({n: names[n] for n in hashed}), objects=sizes,
        settings={"compose_key": key, "options": settings, "gate": gate, ITEMS: items, **_search_of(out)},
        author=author, parents=parents, scores=without_items(scores),
        status="released" if gate["passed"] or gate.get("forced") else "rejected")


def _search_of(out: Path) -> dict[str, Any]:
    """A searched version's lineage: its search's record (trials, their points and scores, the chosen one)."""
    from knowstack.study.steps import SEARCH_FILE

    path = out / SEARCH_FILE
    return {"search": json.loads(path.read_text())} if path.is_file() else {}


def options_from(values: dict[str, Any], method: str | None = None) -> ComposeOptions:
    """ComposeOptions from a mapping that may hold other keys too (e.g. parsed CLI arguments). With `method`, each
    option given (not None) must be one the method reads (its knobs), or one error names the ones it reads; a merge's
    `density` given to DARE is mergekit's and PEFT's fraction kept (combine/merges/ MergeMethod.options_from)."""
    known = {f.name for f in fields(ComposeOptions)}
    given = {k: v for k, v in values.items() if k in known and v is not None}
    if method is not None and method in METHODS:
        given = _read_by(METHODS[method], given)
    return ComposeOptions(**given)


def _read_by(method: Method, given: dict[str, Any]) -> dict[str, Any]:
    """The given options, each one `method` reads; DARE's density as drop_rate."""
    from knowstack.combine.merges import MergeOptions, get_method, option_flag

    merge = method.name.removeprefix(f"{method.catalog}-") if method.catalog in ("merge", "continual-merge") else None
    if merge is not None and "density" in given:
        merge_names = set(MergeOptions.attributes())
        checked = get_method(merge).options_from({k: v for k, v in given.items() if k in merge_names})
        given = {**{k: v for k, v in given.items() if k not in merge_names},
                 **{k: getattr(checked, k) for k in method.knobs if k in merge_names}}
    unread = [name for name in given if name not in method.knobs]
    if unread:
        def spell(name: str) -> str:
            return option_flag({"lam": "lambda", "train_batch_size": "batch_size"}.get(name, name))

        reads = ", ".join(spell(knob) for knob in method.knobs if knob != "router_examples_per_task") or "no options"
        # field: the option's dest, which the CLI words as its flag ("option --top-k: ..."), as merge's check does
        raise KnowstackError(f"'{method.name}' does not read {', '.join(map(spell, unread))}: it reads {reads}",
                             field=unread[0])
    return given

