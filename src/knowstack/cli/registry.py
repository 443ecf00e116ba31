"""Commands of a registry: registry init/list/verify/gc/report, contribute, compose, log, show, diff, export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from knowstack.cli.common import console
from knowstack.cli.common import percent as _percent  # the names _add_compose_args uses
from knowstack.cli.common import points as _points
from knowstack.cli.metric import add_metric_option, metric_problems
from knowstack.cli.options import (
    add_eval_batch_size,
    add_json_option,
    add_lora_moe_router_options,
    add_merge_method_options,
    add_out_option,
    add_protocol_option,
    print_result,
)
from knowstack.cli.vocabulary import add_deprecated, meaning
from knowstack.config import MOE_ROUTERS
from knowstack.errors import KnowstackError


def cmd_registry_init(args: argparse.Namespace) -> None:
    from knowstack import api

    if args.include_path and not args.old_tasks:
        raise KnowstackError("--include-path is where --old-tasks tasks live: give the tasks too")
    from knowstack.validate import check_model_dir, check_old_tasks, raise_problems

    problems = check_model_dir(args.base)
    if args.old_tasks:
        problems += check_old_tasks(args.old_tasks, args.include_path, field="--old-tasks",
                                    include_field="--include-path")
    raise_problems(problems)
    base = api.init_registry(args.registry, args.base, old_tasks=args.old_tasks or (),
                             include_path=args.include_path, eval_batch_size=args.eval_batch_size,
                             limit=args.limit, protocol=args.protocol, num_fewshot=args.num_fewshot,
                             add_bos_token=args.add_bos_token)
    if args.json:
        print(json.dumps(base))
        return
    for score in base["scores"]:
        print(f"old knowledge: {score['task']} {score['metric']} = {score['value']:.4f}")
    from knowstack.registry.core import is_url

    where = args.registry if is_url(args.registry) else Path(args.registry).resolve()
    print(f"registry: {where}  base {base['content_hash'][:12]}  protocol {base['settings']['protocol']}")


def cmd_registry_list(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.registry.listing import format_listing

    with api.open_registry(args.registry) as reg:
        print(json.dumps(reg.versions(), indent=2) if args.json else format_listing(reg))


def cmd_registry_verify(args: argparse.Namespace) -> None:
    from knowstack import api

    with api.open_registry(args.registry) as reg:
        count = reg.verify(args.names or None)
    print(f"verified: {count} objects match their hashes")


def cmd_registry_gc(args: argparse.Namespace) -> None:
    from knowstack import api

    with api.open_registry(args.registry) as reg:
        removed = reg.collect_garbage(grace_seconds=args.grace_hours * 3600, dry_run=args.dry_run)
    size = sum(stored.size for stored in removed) if args.dry_run else None
    for stored in removed:
        print(f"{'would remove' if args.dry_run else 'removed'}: {stored.location}")
    print(f"{len(removed)} unreferenced files" + (f" ({size / 2**20:.1f} MiB)" if size is not None else ""))


def cmd_registry_report(args: argparse.Namespace) -> None:
    from knowstack.registry.page import write_registry_page

    print(f"report: {write_registry_page(args.registry, Path(args.out)).resolve()}")


def cmd_contribute(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.validate import (
        Problem,
        check_adapter_dir,
        check_file,
        check_model_dir,
        check_task_dir,
        raise_problems,
    )

    problems = check_adapter_dir(args.adapter) if args.adapter else check_model_dir(
        args.model, tokenizer=False, adapter_hint="it as --adapter {path}")
    if args.as_lora is not None and args.adapter:
        problems.append(Problem(None, "extracts a LoRA adapter from a full fine-tune: give --model, not --adapter",
                                field="as_lora"))
    problems += check_task_dir(args.task, args.format, required=("test", "train") if args.keep_data else ("test",),
                               optional=("eval",)) or metric_problems(args.task, args.metric, args.format)
    if args.training_config:
        problems += check_file(args.training_config, "training config")
    raise_problems(problems)
    record = api.contribute(args.registry, args.name, task=args.task, adapter=args.adapter, model=args.model,
                            metric=args.metric, keep_data=args.keep_data, task_format=args.format,
                            author=args.author, training_config=args.training_config,
                            eval_batch_size=args.eval_batch_size,
                            statistics=args.statistics, as_lora=args.as_lora)
    from knowstack.registry.evaluate import own_score
    from knowstack.registry.history import extraction_text

    with api.open_registry(args.registry) as reg:
        score = own_score(record, reg.protocol)
    extracted = f"\n  as LoRA: {extraction_text(record['settings'])}" if record["settings"].get("extracted_lora") else ""
    print_result(args, record, f"contributed: {record['name']} ({record['kind']}, {record['content_hash'][:12]}) "
                               f"{record['task']} {score['metric']} = {score['value']:.4f} (metric from "
                               f"{record['settings']['metric_source']}; protocol {score['protocol']}){extracted}")


def cmd_compose(args: argparse.Namespace) -> None:
    from knowstack.registry.compose import compose, options_from
    from knowstack.train.launch import LaunchSpec
    from knowstack.validate import check_accelerate_config, raise_problems

    raise_problems(check_accelerate_config(args.accelerate_config, cpu=args.cpu, field="--accelerate-config"))
    launch = None
    if args.num_processes > 1 or args.accelerate_config:
        launch = LaunchSpec(args.num_processes, args.accelerate_config, args.cpu, args.mixed_precision)
    record = compose(args.registry, args.method, contributions=args.contributions, start=args.start, name=args.name,
                     options=options_from(vars(args), args.method), gate_old=args.gate_old, gate_task=args.gate_task,
                     gate_task_points=args.gate_task_points,
                     author=args.author, batch_size=args.eval_batch_size, launch=launch,
                     force_release=args.force_release,
                     say=lambda message: console.print(f"compose: {message}", highlight=False))
    if args.json:
        print(json.dumps(record))
        return
    from knowstack import api
    from knowstack.registry.history import gate_lines
    from knowstack.registry.listing import built_on, contribution_names, contributions_of

    names: set[str] = set()
    if "against" not in record["settings"]["gate"]:  # recorded before gates named it: tell it by the records
        with api.open_registry(args.registry) as reg:
            names = contribution_names(reg.versions())
    print("\n".join(line.removeprefix("    ") for line in gate_lines(record)))
    forced = " (forced)" if record["settings"]["gate"].get("forced") else ""
    used = len(contributions_of(record, names))
    print(f"{record['name']}: {record['status']}{forced} ({record['method']} of {used} "
          f"contribution{'s' if used != 1 else ''}, built on {built_on(record, names)})")


def cmd_log(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.registry.history import format_log

    with api.open_registry(args.registry) as reg:
        print(json.dumps(reg.versions()) if args.json else format_log(reg))
        if args.plot:
            from knowstack.registry.plot import plot_versions

            points = plot_versions(reg, Path(args.plot))
            print(f"plot: {Path(args.plot).resolve()} ({len(points)} versions)")


def cmd_show(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.registry.history import format_show

    with api.open_registry(args.registry) as reg:
        print(json.dumps(reg.version(args.version), indent=2) if args.json else format_show(reg, args.version))


def cmd_diff(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.registry.history import format_diff

    with api.open_registry(args.registry) as reg:
        print(format_diff(reg, args.first, args.second))


def cmd_export(args: argparse.Namespace) -> None:
    from knowstack import api

    info = api.export(args.registry, args.version, args.out, with_base=args.with_base, overwrite=args.overwrite)
    print_result(args, info, f"exported {info['version']} ({info['kind']}, {info['method']}) to "
                             f"{Path(args.out).resolve()}\nload: {info['load']}")


class _NowTraining(argparse._StoreAction):
    """compose's --batch-size, the evaluation's batch before it meant what it means everywhere (training's)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string == "--batch-size":
            console.print("note: compose's --batch-size is training's examples per optimizer step, as in `knowstack "
                          "train`; the evaluation's batch is --eval-batch-size", highlight=False)
        setattr(namespace, self.dest, values)


REGISTRY_HELP = "the registry: its dir or URL"


def _add_compose_args(p: argparse.ArgumentParser) -> None:
    from knowstack.registry.compose import METHODS, ComposeOptions

    d = ComposeOptions()
    p.add_argument("registry", help=REGISTRY_HELP)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--method", choices=list(METHODS),
                       help=meaning("--method", "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())))
    which.add_argument("--search", dest="method", action="store_const", const="search",
                       help="search the merge (method, lambda, density, per-contribution weights) that learns the most "
                            "on the tasks' eval splits within --max-old-loss, in --trials evaluations: --method search")
    p.add_argument("--contributions", nargs="+", metavar="NAME", help="the contributions to compose, in order "
                                                                       "(default: all, in the order contributed)")
    p.add_argument("--from", dest="start", metavar="VERSION",
                   help="build on this released version: merges take it as one more input, training methods start "
                        "from it (the previous release plus the new contributions)")
    p.add_argument("--name", help=meaning("--name", "the new version's (default: v1, v2, ...)"))
    p.add_argument("--gate-old", type=_percent, default=2.0, metavar="PCT",
                   help="reject if old-knowledge AVE falls more than this below what the version is built from (the "
                        "base, or the --from version; then the base too) (default 2%%)")
    p.add_argument("--gate-task", type=_percent, default=10.0, metavar="PCT",
                   help="reject if any registered task's score falls more than this below the score of what the "
                        "version is built from (default 10%%)")
    p.add_argument("--gate-task-points", type=_points, default=0.0, metavar="POINTS",
                   help="also allow each task to fall this many score points (e.g. 0.02), whichever allowance is "
                        "larger: a task scored near zero would otherwise fail on one example (default 0)")
    p.add_argument("--force-release", action="store_true",
                   help="release the version even if the gate fails (recorded as forced, and shown so by log, "
                        "show and the registry page)")
    p.add_argument("--author", help=meaning("--author"))
    add_eval_batch_size(p, old_name=False)  # compose trains too: its --batch-size is training's
    add_json_option(p, "the new version's record")
    g = p.add_argument_group("merge-* options (each method reads its own: docs/methods.md)")
    add_merge_method_options(g)
    g = p.add_argument_group("search options (--search: docs/search.md)")
    g.add_argument("--trials", type=int, help=f"the search's budget in evaluations (default {d.trials})")
    g.add_argument("--max-old-loss", type=_percent, metavar="PCT",
                   help=meaning("--max-old-loss", "the search's budget, on the items after the registry's --limit "
                                                  f"(default {d.max_old_loss:g}%%)"))
    g = p.add_argument_group("moe-* options")
    g.add_argument("--top-k", type=int, help=f"{meaning('--top-k')} (default {d.top_k})")
    g.add_argument("--router", choices=list(MOE_ROUTERS),
                   help=meaning("--router", f"default {d.router}: from each task's eval prompts; every router: "
                                            "knowstack mix --help"))
    g.add_argument("--prompts-per-expert", type=int,
                   help=f"{meaning('--prompts-per-expert')}: each task's eval prompts (default {d.prompts_per_expert})")
    g.add_argument("--router-steps", type=int, help=f"{meaning('--router-steps')}: on the kept training data "
                                                    f"(default {d.router_steps})")
    g.add_argument("--router-lr", type=float, help=f"{meaning('--router-lr')} (default {d.router_lr})")
    add_lora_moe_router_options(g)  # moe-lora's
    g = p.add_argument_group("training options (sequential, olora, replay, joint)")
    g.add_argument("--finetune", choices=["lora", "fft"], help=f"{meaning('--finetune')} (default {d.finetune})")
    g.add_argument("--lr", type=float, help=meaning("--lr", f"constant (default {d.lr})"))
    g.add_argument("--epochs", type=float, help=f"{meaning('--epochs')} (default {d.epochs})")
    # --batch-size was the evaluation's batch until the vocabulary was made one: say so where it is given
    add_deprecated(g, "--train-batch-size", g.add_argument(
        "--batch-size", dest="train_batch_size", type=int, action=_NowTraining,
        help=f"{meaning('--batch-size')} (default {d.train_batch_size}; the evaluation's: --eval-batch-size)"))
    g.add_argument("--micro-batch-size", type=int, help=f"{meaning('--micro-batch-size')} (default {d.micro_batch_size})")
    g.add_argument("--max-length", type=int, help=f"{meaning('--max-length')} (default {d.max_length})")
    g.add_argument("--lora-r", type=int, help=f"{meaning('--lora-r')} (default {d.lora_r})")
    g.add_argument("--lora-alpha", type=float, help=f"{meaning('--lora-alpha')} (default {d.lora_alpha})")
    g.add_argument("--olora-lambda", type=float, help=f"{meaning('--olora-lambda')} (default {d.olora_lambda})")
    g.add_argument("--replay-fraction", type=float, help=f"{meaning('--replay-fraction')} (default {d.replay_fraction})")
    g.add_argument("--joint-sampling", choices=["uniform", "proportional"],
                   help=f"joint: how the tasks' examples are drawn (default {d.joint_sampling})")
    p.add_argument("--seed", type=int, help=meaning("--seed", f"DARE drops, random routers, training order (default "
                                                              f"{d.seed})"))
    g = p.add_argument_group("launching training (and router training) as accelerate launch of N processes")
    g.add_argument("--num-processes", type=int, default=1, help="processes (default 1: in this process)")
    g.add_argument("--accelerate-config", help="ddp, fsdp, deepspeed-zero2, deepspeed-zero3 or a config file")
    g.add_argument("--cpu", action="store_true", help="processes on the CPU (gloo), e.g. to test without GPUs")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                   help="accelerate's mixed precision (default: the accelerate config's)")



def add_commands(sub: Any) -> None:
    p = sub.add_parser("registry", help="a collaborative registry of one base and many contributions")
    registry = p.add_subparsers(dest="registry_command", required=True)
    r = registry.add_parser("init", help="create a registry for a base model (and record its old-knowledge scores)")
    r.add_argument("registry", help="the registry to create: a new or empty dir, or a URL fsspec reaches "
                                    "(s3://bucket/reg, gs://..., file:///shared/reg; its objects are cached "
                                    "under $KNOWSTACK_CACHE)")
    r.add_argument("--base", required=True, help=meaning("--base", "a local HF model dir with safetensors weights"))
    add_deprecated(r, "--old-knowledge", r.add_argument("--old-tasks", nargs="+", metavar="TASK",
                                                        help=meaning("--old-tasks", "the base is scored on them")))
    r.add_argument("--include-path", help=meaning("--include-path", "the built-in world's: WORLD/old_knowledge"))
    add_eval_batch_size(r)
    r.add_argument("--limit", type=int, help=meaning("--limit", "each old-knowledge task's first LIMIT items, which "
                                                               "every score and the gate read (compose --search "
                                                               "scores the rest)"))
    add_protocol_option(r, "every score the registry records, contributions' and versions', is made so")
    r.add_argument("--num-fewshot", type=int, metavar="N",
                   help="lm-eval's few-shot examples per old-knowledge item, as a study's old_knowledge.num_fewshot "
                        "(default: each task's own)")
    r.add_argument("--add-bos-token", action=argparse.BooleanOptionalAction,
                   help="whether lm-eval's prompts start with the BOS token, as a study's old_knowledge and "
                        "evaluation add_bos_token (the paper's config: --no-add-bos-token; default: the tokenizer's)")
    add_json_option(r, "the base's record")
    r.set_defaults(func=cmd_registry_init)
    r = registry.add_parser("list", help="the base and the contributions, with their scores")
    r.add_argument("registry", help=REGISTRY_HELP)
    add_json_option(r, "every record")
    r.set_defaults(func=cmd_registry_list)
    r = registry.add_parser("verify", help="re-hash the objects of all (or the named) versions")
    r.add_argument("registry", help=REGISTRY_HELP)
    r.add_argument("names", nargs="*", help="versions to check (default: all)")
    r.set_defaults(func=cmd_registry_verify)
    r = registry.add_parser("gc", help="delete stored files no record points to (from failed contributions)")
    r.add_argument("registry", help=REGISTRY_HELP)
    r.add_argument("--grace-hours", type=float, default=1.0,
                   help="keep files younger than this: a contribution in progress has not recorded them yet "
                        "(default 1)")
    r.add_argument("--dry-run", action="store_true", help=meaning("--dry-run", "list what would be removed"))
    r.set_defaults(func=cmd_registry_gc)
    r = registry.add_parser("report", help="one self-contained HTML page: lineage, the learn/forget plane, every "
                                           "version's scores against the base and the specialists, every gate check")
    r.add_argument("registry", help=REGISTRY_HELP)
    r.add_argument("--out", required=True, help=meaning("--out", "the dir of registry.html"))
    r.set_defaults(func=cmd_registry_report)

    p = sub.add_parser("contribute", help="add a LoRA adapter or fine-tuned model of the registry's base, "
                                          "scored on its own task")
    p.add_argument("registry", help=REGISTRY_HELP)
    p.add_argument("--name", required=True, help=meaning("--name", "the contribution's, unique: letters, digits, "
                                                                   "'_', '.', '-' (at most 64)"))
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--adapter", help=meaning("--adapter", "the contribution (adapter_model.safetensors)"))
    weights.add_argument("--model", help=meaning("--model", "the contribution: a fine-tuned model (safetensors "
                                                            "weights)"))
    p.add_argument("--task", required=True, help=meaning("--task", "the contribution's"))
    add_metric_option(p)
    p.add_argument("--format", choices=["trace", "math"], default="trace",
                   help=meaning("--format", "math: MetaMathQA-format train.json, GSM8K-format eval/test (scored by "
                                            "the math metric)"))
    p.add_argument("--keep-data", action="store_true", help="also store the task's train split (default: only "
                                                             "eval and test)")
    p.add_argument("--author", help=meaning("--author"))
    p.add_argument("--training-config", help="a file of the training settings, stored as given")
    add_eval_batch_size(p)
    p.add_argument("--statistics", metavar="DIR", help=meaning("--statistics", "the contribution's own, for compose "
                                                                               "merge-regmean / merge-fisher"))
    p.add_argument("--as-lora", type=int, metavar="RANK",
                   help="contribute the fine-tuned --model as the LoRA adapter extracted from it at this rank "
                        "(`knowstack extract-lora`), so that it joins LoRA merges and LoRA-MoEs")
    add_json_option(p, "the contribution's record")
    p.set_defaults(func=cmd_contribute)

    p = sub.add_parser("compose", help="build the registry's next version from contributions by one method, "
                                       "score it, and release it only if the forgetting gate passes")
    _add_compose_args(p)
    p.set_defaults(func=cmd_compose)
    p = sub.add_parser("log", help="the registry's versions, newest first: lineage, method, key scores, gate")
    p.add_argument("registry", help=REGISTRY_HELP)
    p.add_argument("--plot", metavar="PNG", help="also draw the versions on the learn/forget plane into this PNG")
    add_json_option(p, "every version's record")
    p.set_defaults(func=cmd_log)
    p = sub.add_parser("show", help="one version in full: settings, gate checks, every score")
    p.add_argument("registry", help=REGISTRY_HELP)
    p.add_argument("version", help="the version's name (or the base's, base)")
    add_json_option(p, "the version's record")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("diff", help="two versions task by task")
    p.add_argument("registry", help=REGISTRY_HELP)
    p.add_argument("first", help="a version's name (or base)")
    p.add_argument("second", help="another version's name")
    p.set_defaults(func=cmd_diff)
    p = sub.add_parser("export", help="a version as a plain HF model dir or PEFT / LoRA-MoE dir")
    p.add_argument("registry", help=REGISTRY_HELP)
    p.add_argument("version", help="the version's name")
    add_out_option(p, "the export dir to write")
    p.add_argument("--with-base", action="store_true", help="adapters: copy the base model into OUT/base too")
    add_json_option(p, "what was exported and how to load it")
    p.set_defaults(func=cmd_export)
