"""`knowstack ...`: run a study, or one step of it (train, eval, build-world), or rebuild a report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from knowstack.errors import KnowstackError
from knowstack.logs import library_messages_to

CONFIG_DIR = Path(__file__).parent / "configs"
# soft_wrap: a message is one line whatever the terminal (or none) is, so logs and tests can grep it;
# only tables, meant for the eye, take the terminal's width.
console = Console(stderr=True, soft_wrap=True)


def cmd_study(args: argparse.Namespace) -> None:
    from knowstack.config import load_config
    from knowstack.study.runner import run_study

    config = load_config(args.config)
    executor = None
    if not args.dry_run:
        from knowstack.study.executors import make_executor

        # `demo` reaches here too, without the study command's executor options
        executor = make_executor(getattr(args, "executor", "local"), getattr(args, "address", None))
    outcome = run_study(config, Path(args.out), dry_run=args.dry_run, console=console,
                        config_text=Path(args.config).read_text(encoding="utf-8"), executor=executor,
                        gpu_memory=int(getattr(args, "gpu_memory", 80.0) * 2**30))
    if outcome is not None:
        from knowstack.report.build import write_study_report

        report = write_study_report(outcome.plan, outcome.out, outcome.rows)
        # The page last: `make demo` ends with the path to open.
        print(f"results: {outcome.results_csv.resolve()}\nreport:  {report.resolve()}")


def cmd_demo(args: argparse.Namespace) -> None:
    args.config = str(CONFIG_DIR / "builtin-quick.yaml")
    args.dry_run = False
    cmd_study(args)


def _study_results(directory: str):  # -> tuple[Plan, list[Row]]
    """A study dir's plan and its results so far; one clear error when it is not a study dir or has none."""
    from knowstack.config import load_config
    from knowstack.report.build import study_rows
    from knowstack.study.plan import build_plan

    out = Path(directory)
    if not (out / "config.yaml").is_file():
        raise KnowstackError("not a study dir (no config.yaml): run `knowstack study CONFIG --out DIR` first",
                             path=out)
    plan = build_plan(load_config(out / "config.yaml"), out)
    rows = study_rows(plan, out)
    if not rows:
        raise KnowstackError("no results yet: no evaluation of this study has finished", path=out)
    return plan, rows


def cmd_report(args: argparse.Namespace) -> None:
    from knowstack.report.build import write_study_report

    plan, rows = _study_results(args.dir)
    path = write_study_report(plan, Path(args.dir), rows)
    print(f"markdown: {path.with_name('report.md').resolve()}\nreport:   {path.resolve()}")


def _points(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of score points: {text!r} (e.g. 0.02)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("an allowance is not negative")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r} (e.g. 2%)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a loss limit is not negative")
    return value


def cmd_advise(args: argparse.Namespace) -> None:
    from knowstack.registry.core import is_url
    from knowstack.registry.db import DB_FILE

    if is_url(args.dir) or (Path(args.dir) / DB_FILE).is_file():
        from knowstack.registry.advice import registry_advice
        from knowstack.registry.core import Registry

        with Registry.open(args.dir) as reg:
            print(registry_advice(reg, args.max_old_loss, args.setting))
        return
    from knowstack.report.advice import advice_text, advise
    from knowstack.report.build import measured_points, study_items

    plan, rows = _study_results(args.dir)
    scores, points = measured_points(rows, plan.task_names, plan.config.old_knowledge.metric,
                                     study_items(plan, Path(args.dir)))
    print(advice_text(advise(points, args.max_old_loss, args.setting or "semi"), scores))


def _task_from_args(args: argparse.Namespace):
    from knowstack.config import TaskConfig
    from knowstack.data.tasks import task_from_config

    fields = {"name": Path(args.task or args.train_file).stem, "format": args.format, "metric": args.metric}
    if args.task:
        fields["path"] = Path(args.task)
    for name in ("train_file", "test_file"):
        if getattr(args, name, None):
            fields[name] = Path(getattr(args, name))
    if args.format == "math" and not args.task and "test_file" not in fields:
        fields["test_file"] = fields["train_file"]  # training needs only the train file
    try:
        return task_from_config(TaskConfig(**fields))
    except ValueError as err:
        raise KnowstackError(str(err).splitlines()[-1] if str(err) else "bad task arguments") from None


def _task_arg_problems(args: argparse.Namespace, split: str) -> list:  # -> list[Problem]
    """The task a train (split "train") or eval (split "test") command reads: the split it uses, item by
    item, and the other split a task dir must have."""
    from knowstack.data.formats import trace_split_path
    from knowstack.validate import check_split_file, check_task_dir, problems_of

    if args.task:
        other = "test" if split == "train" else "train"
        given = args.test_file if split == "test" else args.train_file
        problems = check_split_file(given, args.format, split) if given else \
            check_task_dir(args.task, args.format, required=(split,), optional=())
        if not (args.test_file if other == "test" else args.train_file) and Path(args.task).is_dir():
            problems += problems_of(lambda: trace_split_path(Path(args.task), other))
        return problems
    given = args.train_file if split == "train" else args.test_file
    return check_split_file(given, args.format, split) if given else []


def cmd_train(args: argparse.Namespace) -> None:
    """One round of training, as a study step does it: plain, with replay of earlier tasks, or O-LoRA."""
    from knowstack.atomic import atomic_write_json
    from knowstack.data.sampling import replay_mixture
    from knowstack.train import TrainSettings
    from knowstack.train.launch import TrainJob, run_job
    from knowstack.validate import check_adapter_dir, check_model_dir, check_task_dir, raise_problems

    if args.olora_previous and args.finetune != "lora":
        raise KnowstackError("--olora-previous is O-LoRA: it needs --finetune lora")
    problems = check_model_dir(args.model) + _task_arg_problems(args, "train")
    for path in args.replay or []:
        problems += check_task_dir(path, required=("train",), optional=())
    for path in args.olora_previous or []:
        problems += check_adapter_dir(path)
    raise_problems(problems)
    task = _task_from_args(args)
    examples, mixture = task.load("train"), None
    if args.replay:
        earlier = [(path.name, _replay_task(path).load("train")) for path in map(Path, args.replay)]
        examples, mixture = replay_mixture((task.name, examples), earlier, args.replay_fraction, args.seed)
    settings = TrainSettings(
        finetune=args.finetune, lr=args.lr, schedule=args.schedule, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, max_length=args.max_length,
        seed=args.seed, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
    )
    olora = {"previous": args.olora_previous, "lambda": args.olora_lambda} if args.olora_previous else None
    job = TrainJob(model_path=args.model, out_dir=args.out, settings=settings.to_dict(),
                   examples=[(ex.prompt, ex.answer) for ex in examples], progress_desc=f"train {task.name}",
                   olora=olora)
    summary = run_job(job)
    if mixture is not None:
        atomic_write_json(Path(args.out) / "mixture.json", mixture)
    print(json.dumps({k: summary[k] for k in ("steps", "examples") if k in summary}))
    print(f"written: {args.out}")


def _replay_task(path: Path):  # -> TaskSpec
    """An earlier task to replay: a TRACE task dir (its train split)."""
    from knowstack.config import TaskConfig
    from knowstack.data.tasks import task_from_config

    if not path.is_dir():
        raise KnowstackError("--replay takes earlier tasks' dirs (TRACE layout: train.json)", path=path)
    return task_from_config(TaskConfig(name=path.name, path=path, metric="accuracy"))


def _harness_data(task, limit: int | None):  # -> HarnessData | None
    """For math, the GSM8K files lm-eval reads under the paper's protocol (the eval split: few-shot examples)."""
    from knowstack.evaluate.new_knowledge import HarnessData

    return HarnessData(test=task.test_path, fewshot=task.eval_path, limit=limit) if task.format == "math" else None


def cmd_eval(args: argparse.Namespace) -> None:
    from knowstack.evaluate.new_knowledge import evaluate_task
    from knowstack.evaluate.old_knowledge import evaluate_old_knowledge
    from knowstack.modelio import load_model, load_tokenizer
    from knowstack.validate import check_adapter_dir, check_model_dir, check_old_tasks, raise_problems

    problems = check_model_dir(args.model) + (check_adapter_dir(args.adapter) if args.adapter else [])
    if args.task or args.test_file:
        problems += _task_arg_problems(args, "test")
    if args.old_tasks or args.include_path:
        problems += check_old_tasks(args.old_tasks, args.include_path, field="--old-tasks",
                                    include_field="--include-path")
    raise_problems(problems)
    model = load_model(args.model, args.adapter, dtype="float32")
    tokenizer = load_tokenizer(args.model)
    result: dict[str, object] = {}
    if args.task or args.test_file:
        task = _task_from_args(args)
        examples = task.load("test")[: args.limit] if args.limit else task.load("test")
        result[task.name] = evaluate_task(model, tokenizer, examples, task.metric, batch_size=args.batch_size,
                                          protocol=args.protocol, harness=_harness_data(task, args.limit)).scores
    if args.old_tasks:
        include = Path(args.include_path) if args.include_path else None
        result.update(evaluate_old_knowledge(model, tokenizer, args.old_tasks, include_path=include,
                                             batch_size=args.batch_size, limit=args.limit))
    if not result:
        raise KnowstackError("nothing to evaluate: give --task/--test-file or --old-tasks")
    text = json.dumps(result, indent=2)
    if args.out:
        from knowstack.atomic import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")
    print(text)


def _score_task(args: argparse.Namespace):  # -> TaskSpec
    """The task `knowstack score` scores: a TRACE task dir, or (--format math) a GSM8K-format test file."""
    from knowstack.config import TaskConfig
    from knowstack.data.tasks import task_from_config
    from knowstack.evaluate.protocols import TRACE_TASK_METRICS

    where = Path(args.task)
    metric = args.metric or ("math" if args.format == "math" else TRACE_TASK_METRICS.get(where.name))
    if metric is None:
        raise KnowstackError(f"give --metric: '{where.name}' is not a TRACE task name "
                             f"({', '.join(TRACE_TASK_METRICS)})", path=where)
    fields = {"path": where} if args.format == "trace" else {"test_file": where}
    return task_from_config(TaskConfig(name="task", format=args.format, metric=metric, **fields))


def cmd_score(args: argparse.Namespace) -> None:
    """Scores of predictions made elsewhere, with the same reading and metrics as a study's evaluation."""
    from knowstack.evaluate.new_knowledge import score_given_predictions
    from knowstack.evaluate.predictions import read_predictions

    task = _score_task(args)
    examples = task.load("test")
    predictions = read_predictions(Path(args.predictions), len(examples))
    score = score_given_predictions(examples, predictions, task.metric, args.protocol)
    if args.out:
        from knowstack.atomic import atomic_write_text

        atomic_write_text(Path(args.out), "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                                  for row in score.predictions))
    if args.json:
        print(json.dumps(score.scores))
        return
    for metric, value in score.scores.items():
        print(f"{metric}: {value:.4f}  (n={len(examples)}, protocol {args.protocol})")
    if args.out:
        print(f"written: {args.out}")


def cmd_merge(args: argparse.Namespace) -> None:
    from knowstack.combine.merge import merge_models
    from knowstack.combine.merge_methods import MergeOptions
    from knowstack.validate import check_model_dir, check_weights_dir, raise_problems

    problems = check_model_dir(args.base, tokenizer=False) if args.base else []
    raise_problems(problems + [p for path in args.models for p in check_weights_dir(path)])
    given = {"density": args.density, "drop_rate": args.drop_rate, "lam": args.lam, "lora_space": args.lora_space}
    options = MergeOptions(**{name: value for name, value in given.items() if value is not None})
    out = merge_models(args.method, args.models, Path(args.out), base=args.base, weights=args.weights,
                       options=options, seed=args.seed, max_shard_bytes=int(args.max_shard_gb * 2**30),
                       progress=True)
    print(f"merged model: {out}")


def _prompt_lists(files: list[str]) -> list[list[str]]:
    """Each file: a JSON list / JSONL of prompts, as strings or as objects with a "prompt" (a TRACE split)."""
    from knowstack.data.formats import read_records

    lists = []
    for file in files:
        prompts = [item if isinstance(item, str) else item.get("prompt") if isinstance(item, dict) else None
                   for item in read_records(Path(file))]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise KnowstackError("expected a non-empty list of prompts (strings or {\"prompt\": ...})", path=file)
        lists.append(prompts)
    return lists


def cmd_mix(args: argparse.Namespace) -> None:
    from knowstack.combine.moe import MoeOptions, mix_models
    from knowstack.data.formats import load_trace_split
    from knowstack.train.router_training import RouterTraining
    from knowstack.validate import (
        check_model_dir,
        check_prompt_file,
        check_split_file,
        check_weights_dir,
        raise_problems,
    )

    problems = check_model_dir(args.base, tokenizer=bool(args.prompts or args.train_data))
    problems += [p for path in args.models for p in check_weights_dir(path)]
    problems += [p for path in args.prompts or [] for p in check_prompt_file(path)]
    problems += [p for path in args.train_data or [] for p in check_split_file(path, "trace", "train")]
    raise_problems(problems)
    prompts = [p[: args.prompts_per_expert] for p in _prompt_lists(args.prompts)] if args.prompts else None
    router = args.router or ("prompts" if prompts else "random")
    if args.train_data and not args.train_steps:
        raise KnowstackError("--train-data is for router training: give --train-steps too")
    examples = [ex for file in args.train_data or [] for ex in load_trace_split(Path(file))]
    training = None
    if args.train_steps:
        training = RouterTraining(steps=args.train_steps, lr=args.train_lr, batch_size=args.train_batch_size,
                                  aux_loss_coef=args.aux_loss_coef, seed=args.seed)
    options = MoeOptions(top_k=args.top_k, layers=tuple(args.layers) if args.layers else None, shared=args.shared,
                         base_expert=args.base_expert, router=router, seed=args.seed,
                         attention=tuple(args.attention or ()))
    record = mix_models(args.base, args.models, Path(args.out), options=options, prompts=prompts,
                        train_examples=examples, training=training, max_shard_bytes=int(args.max_shard_gb * 2**30))
    counts = record["parameters"]
    print(f"{record['architecture']}: {record['experts']} experts in layers {record['layers']}, "
          f"{counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active per token")
    for when, loads in record.get("loads", {}).items():
        if when != "measured_on":
            print(f"expert load per layer {when.replace('_', ' ')}: {json.dumps(loads)}")
    print(f"mixture of experts: {args.out}")


def cmd_build_world(args: argparse.Namespace) -> None:
    from knowstack.builtin.world import build_world

    path = build_world(Path(args.out), preset=args.preset, seed=args.seed)
    print(f"built-in world: {path}")


def cmd_registry_init(args: argparse.Namespace) -> None:
    from knowstack.registry.base import init_registry

    if args.include_path and not args.old_knowledge:
        raise KnowstackError("--include-path is where --old-knowledge tasks live: give the tasks too")
    from knowstack.validate import check_model_dir, check_old_tasks, raise_problems

    problems = check_model_dir(args.base)
    if args.old_knowledge:
        problems += check_old_tasks(args.old_knowledge, args.include_path, field="--old-knowledge",
                                    include_field="--include-path")
    raise_problems(problems)
    base = init_registry(args.registry, args.base, old_tasks=args.old_knowledge or (),
                         include_path=args.include_path, batch_size=args.batch_size, limit=args.limit)
    for score in base["scores"]:
        print(f"old knowledge: {score['task']} {score['metric']} = {score['value']:.4f}")
    from knowstack.registry.core import is_url

    where = args.registry if is_url(args.registry) else Path(args.registry).resolve()
    print(f"registry: {where}  base {base['content_hash'][:12]}")


def cmd_registry_list(args: argparse.Namespace) -> None:
    from knowstack.registry.core import Registry
    from knowstack.registry.listing import format_listing

    with Registry.open(args.registry) as reg:
        print(json.dumps(reg.versions(), indent=2) if args.json else format_listing(reg))


def cmd_registry_verify(args: argparse.Namespace) -> None:
    from knowstack.registry.core import Registry

    with Registry.open(args.registry) as reg:
        count = reg.verify(args.names or None)
    print(f"verified: {count} objects match their hashes")


def cmd_registry_gc(args: argparse.Namespace) -> None:
    from knowstack.registry.core import Registry

    with Registry.open(args.registry) as reg:
        removed = reg.collect_garbage(grace_seconds=args.grace_hours * 3600, dry_run=args.dry_run)
    size = sum(stored.size for stored in removed) if args.dry_run else None
    for stored in removed:
        print(f"{'would remove' if args.dry_run else 'removed'}: {stored.location}")
    print(f"{len(removed)} unreferenced files" + (f" ({size / 2**20:.1f} MiB)" if size is not None else ""))


def cmd_registry_report(args: argparse.Namespace) -> None:
    from knowstack.registry.page import write_registry_page

    print(f"report: {write_registry_page(args.registry, Path(args.out)).resolve()}")


def cmd_contribute(args: argparse.Namespace) -> None:
    from knowstack.registry.contribute import contribute
    from knowstack.validate import (
        check_adapter_dir,
        check_file,
        check_model_dir,
        check_task_dir,
        raise_problems,
    )

    problems = check_adapter_dir(args.adapter) if args.adapter else check_model_dir(args.model, tokenizer=False)
    problems += check_task_dir(args.task, args.format, required=("test", "train") if args.keep_data else ("test",),
                               optional=("eval",))
    if args.training_config:
        problems += check_file(args.training_config, "training config")
    raise_problems(problems)
    record = contribute(args.registry, args.name, task=args.task, adapter=args.adapter, model=args.model,
                        metric=args.metric, keep_data=args.keep_data, task_format=args.format, author=args.author,
                        training_config=args.training_config, batch_size=args.batch_size)
    score = next(s for s in record["scores"] if s["kind"] == "new")
    print(f"contributed: {record['name']} ({record['kind']}, {record['content_hash'][:12]}) "
          f"{record['task']} {score['metric']} = {score['value']:.4f}")


def cmd_compose(args: argparse.Namespace) -> None:
    from knowstack.registry.compose import compose, options_from
    from knowstack.train.launch import LaunchSpec
    from knowstack.validate import check_accelerate_config, raise_problems

    raise_problems(check_accelerate_config(args.accelerate_config, cpu=args.cpu, field="--accelerate-config"))
    launch = None
    if args.num_processes > 1 or args.accelerate_config:
        launch = LaunchSpec(args.num_processes, args.accelerate_config, args.cpu, args.mixed_precision)
    record = compose(args.registry, args.method, contributions=args.contributions, start=args.start, name=args.name,
                     options=options_from(vars(args)), gate_old=args.gate_old, gate_task=args.gate_task,
                     gate_task_points=args.gate_task_points,
                     author=args.author, batch_size=args.batch_size, launch=launch,
                     say=lambda message: console.print(f"compose: {message}", highlight=False))
    gate = record["settings"]["gate"]
    for failure in gate["failed"]:
        print(f"gate: {failure}")
    if gate.get("note"):
        print(f"gate: {gate['note']}")
    print(f"{record['name']}: {record['status']} ({record['method']} of {len(record['parents'])} contributions)")


def cmd_log(args: argparse.Namespace) -> None:
    from knowstack.registry.core import Registry
    from knowstack.registry.history import format_log

    with Registry.open(args.registry) as reg:
        print(format_log(reg))
        if args.plot:
            from knowstack.registry.plot import plot_versions

            points = plot_versions(reg, Path(args.plot))
            print(f"plot: {Path(args.plot).resolve()} ({len(points)} versions)")


def cmd_show(args: argparse.Namespace) -> None:
    from knowstack.registry.core import Registry
    from knowstack.registry.history import format_show

    with Registry.open(args.registry) as reg:
        print(json.dumps(reg.version(args.version), indent=2) if args.json else format_show(reg, args.version))


def cmd_diff(args: argparse.Namespace) -> None:
    from knowstack.registry.core import Registry
    from knowstack.registry.history import format_diff

    with Registry.open(args.registry) as reg:
        print(format_diff(reg, args.first, args.second))


def cmd_export(args: argparse.Namespace) -> None:
    from knowstack.registry.export import export_version

    info = export_version(args.registry, args.version, args.out, with_base=args.with_base)
    print(f"exported {info['version']} ({info['kind']}, {info['method']}) to {Path(args.out).resolve()}\n"
          f"load: {info['load']}")


def _add_compose_args(p: argparse.ArgumentParser) -> None:
    from knowstack.registry.compose import METHODS, ComposeOptions

    d = ComposeOptions()
    p.add_argument("registry")
    p.add_argument("--method", required=True, choices=list(METHODS),
                   help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    p.add_argument("--contributions", nargs="+", metavar="NAME", help="the contributions to compose, in order "
                                                                       "(default: all, in the order contributed)")
    p.add_argument("--from", dest="start", metavar="VERSION",
                   help="build on this released version: merges take it as one more input, training methods start "
                        "from it (the previous release plus the new contributions)")
    p.add_argument("--name", help="the new version's name (default: v1, v2, ...)")
    p.add_argument("--gate-old", type=_percent, default=2.0, metavar="PCT",
                   help="reject if old-knowledge AVE falls more than this below the base or the previous release "
                        "(default 2%%)")
    p.add_argument("--gate-task", type=_percent, default=10.0, metavar="PCT",
                   help="reject if any registered task's score falls more than this below its best release "
                        "(default 10%%)")
    p.add_argument("--gate-task-points", type=_points, default=0.0, metavar="POINTS",
                   help="also allow each task to fall this many score points (e.g. 0.02), whichever allowance is "
                        "larger: a task scored near zero would otherwise fail on one example (default 0)")
    p.add_argument("--author")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    g = p.add_argument_group("merge-* options")
    g.add_argument("--density", type=float, help=f"TIES: fraction of each task vector kept (default {d.density})")
    g.add_argument("--drop-rate", type=float, help=f"DARE: drop probability (default {d.drop_rate})")
    g.add_argument("--lambda", dest="lam", type=float, help=f"scale of the merged task vector (default {d.lam})")
    g = p.add_argument_group("moe-* options")
    g.add_argument("--top-k", type=int, help=f"experts per token (default {d.top_k})")
    g.add_argument("--router", choices=["prompts", "random", "uniform", "base-biased", "none"],
                   help=f"router init (default {d.router}: from each task's eval prompts)")
    g.add_argument("--prompts-per-expert", type=int, help=f"default {d.prompts_per_expert}")
    g.add_argument("--router-steps", type=int, help="router-only training steps on the kept training data "
                                                     f"(default {d.router_steps})")
    g.add_argument("--router-lr", type=float, help=f"default {d.router_lr}")
    g = p.add_argument_group("training options (sequential, olora, replay, joint)")
    g.add_argument("--finetune", choices=["lora", "fft"], help=f"default {d.finetune}")
    g.add_argument("--lr", type=float, help=f"constant learning rate (default {d.lr})")
    g.add_argument("--epochs", type=float, help=f"default {d.epochs}")
    g.add_argument("--train-batch-size", dest="train_batch_size", type=int,
                   help=f"examples per optimizer step (default {d.train_batch_size})")
    g.add_argument("--micro-batch-size", type=int, help=f"default {d.micro_batch_size}")
    g.add_argument("--max-length", type=int, help=f"default {d.max_length}")
    g.add_argument("--lora-r", type=int, help=f"default {d.lora_r}")
    g.add_argument("--lora-alpha", type=int, help=f"default {d.lora_alpha}")
    g.add_argument("--olora-lambda", type=float, help=f"default {d.olora_lambda}")
    g.add_argument("--replay-fraction", type=float, help=f"default {d.replay_fraction}")
    g.add_argument("--joint-sampling", choices=["uniform", "proportional"], help=f"default {d.joint_sampling}")
    p.add_argument("--seed", type=int, help=f"DARE drops, random routers, training order (default {d.seed})")
    g = p.add_argument_group("launching training (and router training) as accelerate launch of N processes")
    g.add_argument("--num-processes", type=int, default=1, help="processes (default 1: in this process)")
    g.add_argument("--accelerate-config", help="ddp, fsdp, deepspeed-zero2, deepspeed-zero3 or a config file")
    g.add_argument("--cpu", action="store_true", help="processes on the CPU (gloo), e.g. to test without GPUs")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])


METRIC_CHOICES = ("accuracy", "exact_match", "rouge_l", "edit_similarity", "sari", "math")


def _add_task_args(parser: argparse.ArgumentParser, *, metric_required: bool) -> None:
    parser.add_argument("--task", help="a TRACE-layout task dir (train.json, eval.json, test.json)")
    parser.add_argument("--format", choices=["trace", "math"], default="trace")
    parser.add_argument("--train-file", help="math: a MetaMathQA-format JSON file")
    parser.add_argument("--test-file", help="math: a GSM8K-format JSON/JSONL file")
    parser.add_argument("--metric", default="accuracy", required=metric_required, choices=list(METRIC_CHOICES))


def build_parser() -> argparse.ArgumentParser:
    from typing import get_args

    from knowstack.config import MergeMethodName

    parser = argparse.ArgumentParser(prog="knowstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("study", help="run a study from a YAML config (resumes where it stopped)")
    p.add_argument("config")
    p.add_argument("--out", required=True, help="the study dir (artifacts, results.csv, report.html)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, which steps are done, and each step's estimated GPU memory and GPUs")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where steps run: here in plan order (local), or as Ray tasks, each ready step at once (ray)")
    p.add_argument("--address", help="ray: the cluster to join ('auto', 'HOST:6379', 'ray://HOST:10001'); "
                                     "default: start a local Ray")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="dry run: GiB per GPU (default 80)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("demo", help="the quick built-in study (configs/builtin-quick.yaml)")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="write a study dir's report (report.html, report.md, figures/, tables/) "
                                      "from its results; a study still running reports what has finished")
    p.add_argument("dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("advise", help="which method to use: the measured setting that learns the most within a "
                                      "limit on old-knowledge loss")
    p.add_argument("dir", help="a study dir, or a registry (advice for its next version, from its history)")
    p.add_argument("--max-old-loss", type=_percent, default=2.0,
                   help="how far old knowledge (AVE) may fall below the base's, in percent (default 2%%)")
    p.add_argument("--setting", choices=["semi", "full"],
                   help="semi: the contributors share models only; full: their training data too (default: semi; "
                        "a registry: full when every contribution kept its data)")
    p.set_defaults(func=cmd_advise)

    p = sub.add_parser("train", help="one training run: FFT (full model out) or LoRA (PEFT adapter out)")
    p.add_argument("--model", required=True, help="HF model dir or hub id to start from")
    _add_task_args(p, metric_required=False)
    p.add_argument("--finetune", choices=["fft", "lora"], default="lora")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="constant")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--replay", nargs="+", metavar="TASKDIR",
                   help="replay: earlier tasks' dirs; each adds --replay-fraction x |task| of its examples")
    p.add_argument("--replay-fraction", type=float, default=0.1, help="replay: the fraction (default 0.1)")
    p.add_argument("--olora-previous", nargs="+", metavar="ADAPTER",
                   help="O-LoRA: the earlier rounds' LoRA adapter dirs, penalised against (needs --finetune lora)")
    p.add_argument("--olora-lambda", type=float, default=0.5, help="O-LoRA: the penalty's weight (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a model (+adapter) on a task and/or lm-eval old-knowledge tasks")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    _add_task_args(p, metric_required=False)
    p.add_argument("--old-tasks", nargs="*", default=[], help="lm-eval task names")
    p.add_argument("--include-path", help="a dir of lm-eval task YAMLs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int)
    p.add_argument("--protocol", choices=["builtin", "paper"], default="builtin",
                   help="how answers are read and scored (default builtin; paper: the paper's TRACE/GSM8K scoring)")
    p.add_argument("--out", help="write the scores as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="score predictions made elsewhere (vLLM, another harness) on a task's test "
                                     "split, with the same reading and metrics as `eval`")
    p.add_argument("task", help="a TRACE task dir (its test.json), or with --format math a GSM8K-format test file")
    p.add_argument("--predictions", required=True,
                   help='JSON Lines of {"prediction": ...} in test order, or a JSON list of strings')
    p.add_argument("--format", choices=["trace", "math"], default="trace")
    p.add_argument("--metric", choices=list(METRIC_CHOICES),
                   help="default: the TRACE task's own metric, from the dir name (e.g. MeetingBank: rouge_l)")
    p.add_argument("--protocol", choices=["builtin", "paper"], default="builtin")
    p.add_argument("--json", action="store_true", help="print one JSON object {metric: value}")
    p.add_argument("--out", help="write one JSON line per test item (prompt, reference, prediction, answer, scores)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("merge", help="merge fine-tuned models and/or LoRA adapters of one base into one model")
    p.add_argument("--method", required=True, choices=get_args(MergeMethodName))
    p.add_argument("--base", help="the base model dir (needed by all methods but a plain average of full models)")
    p.add_argument("--models", nargs="+", required=True, help="model dirs and/or PEFT LoRA adapter dirs")
    p.add_argument("--weights", nargs="+", type=float, help="one positive weight per model (default: equal)")
    p.add_argument("--density", type=float, help="ties: fraction of each task vector kept (default 0.2)")
    p.add_argument("--drop-rate", type=float, help="dare, ties-dare: probability of dropping (default 0.9)")
    p.add_argument("--lambda", dest="lam", type=float, help="scale of the merged task vector (default 1)")
    p.add_argument("--seed", type=int, default=0, help="dare, ties-dare: the random drops")
    p.add_argument("--lora-space", choices=("delta", "factors"),
                   help="LoRA adapters: merge their deltas s*B@A (delta, the default) or their A and B apart as PEFT's "
                        "add_weighted_adapter does (factors: the paper's LoRA TIES / DARE-TIES; weights are PEFT's, "
                        "1 each by default)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output shard")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("mix", help="mix fine-tuned models (FFT-MoE) or LoRA adapters (LoRA-MoE) of one base "
                                   "into a mixture of experts")
    p.add_argument("--base", required=True, help="the base model dir")
    p.add_argument("--models", nargs="+", required=True, help="model dirs (FFT-MoE) or PEFT LoRA adapter dirs")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--layers", nargs="+", type=int, help="the layers to mix (default: all)")
    p.add_argument("--shared", choices=["base", "average"], default="base",
                   help="FFT-MoE: attention, norms and embeddings from the base or the models' average")
    p.add_argument("--base-expert", choices=["none", "routed", "always-on"], default="none",
                   help="the base as a routed expert, or always active (FFT-MoE)")
    p.add_argument("--attention", nargs="+", choices=["q_proj", "k_proj", "v_proj", "o_proj"],
                   help="FFT-MoE: these self-attention projections are experts too, each with its own router")
    p.add_argument("--router", choices=["random", "uniform", "base-biased", "prompts", "none"],
                   help="router init (default: prompts if --prompts is given, else random); none: router-free")
    p.add_argument("--prompts", nargs="+", help="one JSON/JSONL file of prompts per model, in order")
    p.add_argument("--prompts-per-expert", type=int, default=8, help="prompts used from each file (default 8)")
    p.add_argument("--train-data", nargs="+", help="router training: TRACE-format files of prompt/answer items")
    p.add_argument("--train-steps", type=int, default=0, help="router training steps (default 0: none)")
    p.add_argument("--train-lr", type=float, default=1e-3)
    p.add_argument("--train-batch-size", type=int, default=8)
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="weight of the load-balancing loss")
    p.add_argument("--seed", type=int, default=0, help="random routers and the training order")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output shard (FFT-MoE)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_mix)

    p = sub.add_parser("build-world", help="build the built-in world (base model, tokenizer, tasks)")
    p.add_argument("--preset", choices=["test", "quick", "full"], default="quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_build_world)

    p = sub.add_parser("registry", help="a collaborative registry of one base and many contributions")
    registry = p.add_subparsers(dest="registry_command", required=True)
    r = registry.add_parser("init", help="create a registry for a base model (and record its old-knowledge scores)")
    r.add_argument("registry", help="the registry to create: a new or empty dir, or a URL fsspec reaches "
                                    "(s3://bucket/reg, gs://..., file:///shared/reg; its objects are cached "
                                    "under $KNOWSTACK_CACHE)")
    r.add_argument("--base", required=True, help="the base model: a local HF model dir with safetensors weights")
    r.add_argument("--old-knowledge", nargs="+", metavar="TASK", help="lm-eval tasks to score the base on")
    r.add_argument("--include-path", help="a dir of lm-eval task YAMLs (the built-in world's: WORLD/old_knowledge)")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--limit", type=int, help="at most this many examples per old-knowledge task")
    r.set_defaults(func=cmd_registry_init)
    r = registry.add_parser("list", help="the base and the contributions, with their scores")
    r.add_argument("registry")
    r.add_argument("--json", action="store_true", help="every record as JSON")
    r.set_defaults(func=cmd_registry_list)
    r = registry.add_parser("verify", help="re-hash the objects of all (or the named) versions")
    r.add_argument("registry")
    r.add_argument("names", nargs="*", help="versions to check (default: all)")
    r.set_defaults(func=cmd_registry_verify)
    r = registry.add_parser("gc", help="delete stored files no record points to (from failed contributions)")
    r.add_argument("registry")
    r.add_argument("--grace-hours", type=float, default=1.0,
                   help="keep files younger than this: a contribution in progress has not recorded them yet "
                        "(default 1)")
    r.add_argument("--dry-run", action="store_true", help="list what would be removed")
    r.set_defaults(func=cmd_registry_gc)
    r = registry.add_parser("report", help="one self-contained HTML page: lineage, the learn/forget plane, every "
                                           "version's scores against the base and the specialists, every gate check")
    r.add_argument("registry")
    r.add_argument("--out", required=True, help="the dir to write registry.html into")
    r.set_defaults(func=cmd_registry_report)

    p = sub.add_parser("contribute", help="add a LoRA adapter or fine-tuned model of the registry's base, "
                                          "scored on its own task")
    p.add_argument("registry")
    p.add_argument("--name", required=True, help="a unique name: letters, digits, '_', '.', '-' (at most 64)")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--adapter", help="a PEFT LoRA adapter dir (adapter_model.safetensors)")
    weights.add_argument("--model", help="a fine-tuned model dir (safetensors weights)")
    p.add_argument("--task", required=True, help="its task: a TRACE-layout dir (test.json, eval.json, train.json)")
    p.add_argument("--metric", default="accuracy", choices=["accuracy", "rouge_l", "edit_similarity", "sari", "math"])
    p.add_argument("--format", choices=["trace", "math"], default="trace",
                   help="math: MetaMathQA-format train.json, GSM8K-format eval/test (use with --metric math)")
    p.add_argument("--keep-data", action="store_true", help="also store the task's train split (default: only "
                                                             "eval and test)")
    p.add_argument("--author")
    p.add_argument("--training-config", help="a file of the training settings, stored as given")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_contribute)

    p = sub.add_parser("compose", help="build the registry's next version from contributions by one method, "
                                       "score it, and release it only if the forgetting gate passes")
    _add_compose_args(p)
    p.set_defaults(func=cmd_compose)
    p = sub.add_parser("log", help="the registry's versions, newest first: lineage, method, key scores, gate")
    p.add_argument("registry")
    p.add_argument("--plot", metavar="PNG", help="also draw the versions on the learn/forget plane into this PNG")
    p.set_defaults(func=cmd_log)
    p = sub.add_parser("show", help="one version in full: settings, gate checks, every score")
    p.add_argument("registry")
    p.add_argument("version")
    p.add_argument("--json", action="store_true", help="the record as JSON")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("diff", help="two versions task by task")
    p.add_argument("registry")
    p.add_argument("first")
    p.add_argument("second")
    p.set_defaults(func=cmd_diff)
    p = sub.add_parser("export", help="a version as a plain HF model dir or PEFT / LoRA-MoE dir")
    p.add_argument("registry")
    p.add_argument("version")
    p.add_argument("--out", required=True, help="a new dir")
    p.add_argument("--with-base", action="store_true", help="adapters: copy the base model into OUT/base too")
    p.set_defaults(func=cmd_export)
    return parser


def _quiet_libraries() -> None:
    """Per-file loading/saving bars of transformers and datasets drown the study's own progress."""
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        # Library warnings stay off the console (a study step writes them to its log: knowstack.logs).
        with library_messages_to(None):
            args.func(args)
    except KnowstackError as err:
        # escaped: a path or value in the message (`data/[v2]/train.json`) is text, not rich markup
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: finished steps are kept; run the same command again to resume")
        return 130
    except BrokenPipeError:  # `knowstack log REG | head`: the reader is gone, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        from knowstack.registry.core import is_url

        where = getattr(args, "registry", None) or getattr(args, "dir", None)
        if not (isinstance(where, str) and is_url(where)):
            raise
        # A remote store's failures (credentials, no such bucket, network) are the user's to fix, not a bug.
        console.print(f"[red]error:[/red] {where}: the registry's store failed: {err!r}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
