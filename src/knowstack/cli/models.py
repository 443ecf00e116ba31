"""Commands of one model at a time: train, eval, score, merge, statistics, mix, build-world."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from knowstack.cli.options import (
    MERGE_ONLY_OPTIONS,
    STATISTICS_MERGE_OPTIONS,
    add_dtype_option,
    add_merge_options,
    add_statistics_merge_options,
    add_training_options,
    training_from_args,
)
from knowstack.config import METRICS, MOE_PRESETS, MOE_ROUTERS, RouterTrainingConfig
from knowstack.errors import KnowstackError


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
    from knowstack import api
    from knowstack.validate import (
        check_adapter_dir,
        check_lora_targets,
        check_model_dir,
        check_task_dir,
        raise_problems,
    )

    if args.olora_previous and args.finetune != "lora":
        raise KnowstackError("--olora-previous is O-LoRA: it needs --finetune lora")
    problems = check_model_dir(args.model) + _task_arg_problems(args, "train")
    for path in args.replay or []:
        problems += check_task_dir(path, required=("train",), optional=())
    for path in args.olora_previous or []:
        problems += check_adapter_dir(path)
    raise_problems(problems)
    training = training_from_args(args)
    if args.finetune == "lora":  # read from the checked model dir's weights' names
        raise_problems(check_lora_targets(args.model, training.lora.target_modules))
    summary = api.train(args.model, _task_from_args(args), args.out, finetune=args.finetune,
                        training=training, seed=args.seed, replay=args.replay or (),
                        replay_fraction=args.replay_fraction, olora_previous=args.olora_previous or (),
                        olora_lambda=args.olora_lambda, tokenizer=args.tokenizer,
                        trust_remote_code=args.trust_remote_code)
    print(json.dumps({k: summary[k] for k in ("steps", "examples") if k in summary}))
    print(f"written: {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.validate import check_adapter_dir, check_model_dir, check_old_tasks, raise_problems

    problems = check_model_dir(args.model, adapter_hint="--model BASE --adapter {path}")
    problems += check_adapter_dir(args.adapter) if args.adapter else []
    if args.task or args.test_file:
        problems += _task_arg_problems(args, "test")
    if args.old_tasks or args.include_path:
        problems += check_old_tasks(args.old_tasks, args.include_path, field="--old-tasks",
                                    include_field="--include-path")
    raise_problems(problems)
    if not (args.task or args.test_file or args.old_tasks):
        raise KnowstackError("nothing to evaluate: give --task/--test-file or --old-tasks")
    task = _task_from_args(args) if args.task or args.test_file else None
    result = api.evaluate(args.model, adapter=args.adapter, tasks={task.name: task} if task else None,
                          old_tasks=args.old_tasks, include_path=args.include_path, limit=args.limit,
                          batch_size=args.batch_size, protocol=args.protocol)
    text = json.dumps(result, indent=2)
    if args.out:
        from knowstack.atomic import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")
    print(text)


def cmd_score(args: argparse.Namespace) -> None:
    """Scores of predictions made elsewhere, with the same reading and metrics as a study's evaluation."""
    from knowstack import api
    from knowstack.evaluate.protocols import TRACE_TASK_METRICS

    where = Path(args.task)
    if args.metric is None and args.format == "trace" and where.name not in TRACE_TASK_METRICS:
        raise KnowstackError(f"give --metric: '{where.name}' is not a TRACE task name "
                             f"({', '.join(TRACE_TASK_METRICS)})", path=where)
    score = api.score_predictions(where, Path(args.predictions), metric=args.metric, task_format=args.format,
                                  protocol=args.protocol)
    if args.out:
        from knowstack.atomic import atomic_write_text

        atomic_write_text(Path(args.out), "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                                  for row in score.predictions))
    if args.json:
        print(json.dumps(score.scores))
        return
    for metric, value in score.scores.items():
        print(f"{metric}: {value:.4f}  (n={score.n}, protocol {args.protocol})")
    if args.out:
        print(f"written: {args.out}")


def cmd_merge(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.validate import check_model_dir, check_weights_dir, raise_problems

    problems = check_model_dir(args.base, tokenizer=False) if args.base else []
    raise_problems(problems + [p for path in args.models for p in check_weights_dir(path)])
    out = api.merge(args.method, args.models, args.out, base=args.base, weights=args.weights, density=args.density,
                    drop_rate=args.drop_rate, lam=args.lam, lora_space=args.lora_space, seed=args.seed,
                    max_shard_gb=args.max_shard_gb, progress=True, statistics=args.statistics, dtype=args.dtype,
                    **{name: getattr(args, name) for name in MERGE_ONLY_OPTIONS + STATISTICS_MERGE_OPTIONS
                       if getattr(args, name) is not None})
    print(f"merged model: {out}")


def cmd_statistics(args: argparse.Namespace) -> None:
    from knowstack import api

    out = api.statistics(args.model, args.data, args.out, base=args.base, kinds=args.kind, examples=args.examples,
                         max_length=args.max_length, tokenizer=args.tokenizer,
                         trust_remote_code=args.trust_remote_code)
    record = json.loads((out / "statistics.json").read_text(encoding="utf-8"))
    for kind, entry in record["statistics"].items():
        print(f"{kind}: {entry['examples']} examples, {entry['tokens']} tokens")
    print(f"statistics: {out}")


def cmd_mix(args: argparse.Namespace) -> None:
    from knowstack import api
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
    shared, router, train_steps = args.shared, args.router, args.train_steps
    if args.preset is not None:  # the preset's settings where the command line leaves them open
        preset = MOE_PRESETS[args.preset]
        shared, router = preset["shared"], router or preset["router"]
        if "router_training" in preset:
            if not args.train_data:
                raise KnowstackError(f"--preset {args.preset} trains the routers: give --train-data", field="train_data")
            train_steps = train_steps or RouterTrainingConfig().steps
    if args.train_data and not train_steps:
        raise KnowstackError("--train-data is for router training: give --train-steps too")
    record = api.mix(args.base, args.models, args.out, prompts=args.prompts, prompts_per_expert=args.prompts_per_expert,
                     train_data=args.train_data or (), train_steps=train_steps, train_lr=args.train_lr,
                     train_batch_size=args.train_batch_size, aux_loss_coef=args.aux_loss_coef,
                     max_shard_gb=args.max_shard_gb, top_k=args.top_k, layers=args.layers, shared=shared,
                     base_expert=args.base_expert, router=router, seed=args.seed,
                     attention=args.attention or (), routing=args.routing, temperature=args.temperature,
                     dtype=args.dtype)
    counts = record["parameters"]
    print(f"{record['architecture']}: {record['experts']} experts in layers {record['layers']}, "
          f"{counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active per token")
    for when, loads in record.get("loads", {}).items():
        if when != "measured_on":
            print(f"expert load per layer {when.replace('_', ' ')}: {json.dumps(loads)}")
    print(f"mixture of experts: {args.out}")


def cmd_gate(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.validate import check_model_dir, check_split_file, check_weights_dir, raise_problems

    problems = check_model_dir(args.base, tokenizer=True) + check_weights_dir(args.adapter)
    problems += [p for path in args.train_data for p in check_split_file(path, "trace", "train")]
    raise_problems(problems)
    summary = api.gate(args.base, args.adapter, args.train_data, steps=args.steps, lr=args.lr,
                       batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    print(f"gates of {summary['modules']} modules, loss {summary['first']} -> {summary['last']} in "
          f"{summary['steps']} steps: {summary['file']}")


def cmd_build_world(args: argparse.Namespace) -> None:
    from knowstack import api

    path = api.build_world(args.out, preset=args.preset, seed=args.seed)
    print(f"built-in world: {path}")


def _add_task_args(parser: argparse.ArgumentParser, *, metric_required: bool) -> None:
    parser.add_argument("--task", help="a TRACE-layout task dir (train.json, eval.json, test.json)")
    parser.add_argument("--format", choices=["trace", "math"], default="trace")
    parser.add_argument("--train-file", help="math: a MetaMathQA-format JSON file")
    parser.add_argument("--test-file", help="math: a GSM8K-format JSON/JSONL file")
    parser.add_argument("--metric", default="accuracy", required=metric_required, choices=list(METRICS))


def add_commands(sub: Any) -> None:
    from typing import get_args

    from knowstack.config import (
        MergeConfig,
        MergeMethodName,
        MoeConfig,
        OLoraConfig,
        ReplayConfig,
        RouterTrainingConfig,
        TrainingConfig,
    )

    merge, moe, routers = MergeConfig(), MoeConfig(), RouterTrainingConfig()

    p = sub.add_parser("train", help="one training run: FFT (full model out) or LoRA (PEFT adapter out)")
    p.add_argument("--model", required=True, help="HF model dir or hub id to start from")
    _add_task_args(p, metric_required=False)
    p.add_argument("--finetune", choices=["fft", "lora"], default="lora")
    p.add_argument("--tokenizer", help="the tokenizer, where it is not the model dir's (as a study's base.tokenizer)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)")
    add_training_options(p)
    p.add_argument("--replay", nargs="+", metavar="TASKDIR",
                   help="replay: earlier tasks' dirs; each adds --replay-fraction x |task| of its examples")
    p.add_argument("--replay-fraction", type=float, default=ReplayConfig().fraction,
                   help=f"replay: the fraction (default {ReplayConfig().fraction})")
    p.add_argument("--olora-previous", nargs="+", metavar="ADAPTER",
                   help="O-LoRA: the earlier rounds' LoRA adapter dirs, penalised against (needs --finetune lora)")
    p.add_argument("--olora-lambda", type=float, default=OLoraConfig().lambdas[0],
                   help=f"O-LoRA: the penalty's weight (default {OLoraConfig().lambdas[0]}, the paper's first run)")
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
    p.add_argument("--metric", choices=list(METRICS),
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
    p.add_argument("--density", type=float, help=f"ties: fraction of each task vector kept (default {merge.density})")
    p.add_argument("--drop-rate", type=float,
                   help=f"dare, ties-dare: probability of dropping (default {merge.drop_rate})")
    p.add_argument("--lambda", dest="lam", type=float, help=f"scale of the merged task vector (default {merge.lam})")
    add_merge_options(p)
    add_statistics_merge_options(p)
    p.add_argument("--statistics", nargs="+", metavar="DIR",
                   help="regmean, fisher: one statistics dir per model, in the models' order (`knowstack statistics`)")
    p.add_argument("--seed", type=int, default=0, help="dare, ties-dare, della: the random drops")
    p.add_argument("--lora-space", choices=("delta", "factors"),
                   help="LoRA adapters: merge their deltas s*B@A (delta, the default) or their A and B apart as PEFT's "
                        "add_weighted_adapter does (factors: the paper's LoRA TIES / DARE-TIES; weights are PEFT's, "
                        "1 each by default)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output shard")
    add_dtype_option(p, "the merged model's weights")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("statistics", help="statistics of a model's (or adapter's) training data for the regmean and "
                                          "fisher merges, shared instead of the data")
    p.add_argument("model", help="a model dir (FFT) or a PEFT LoRA adapter dir (give --base)")
    p.add_argument("--data", required=True, help="its training data: a TRACE-format file of prompt/answer items")
    p.add_argument("--base", help="the base model dir, for an adapter")
    p.add_argument("--kind", nargs="+", choices=["gram", "fisher"], default=["gram", "fisher"],
                   help="gram: RegMean's input Gram matrices; fisher: the diagonal Fisher (default both)")
    p.add_argument("--examples", type=int, help=f"the first examples used (default {merge.statistics_examples})")
    p.add_argument("--max-length", type=int, help="tokens per example, as training's max_length (default "
                                                  f"{TrainingConfig().max_length})")
    p.add_argument("--tokenizer", help="the tokenizer, where it is not the model's (or the base's, for an adapter)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)")
    p.add_argument("--out", required=True, help="the statistics dir to write")
    p.set_defaults(func=cmd_statistics)

    p = sub.add_parser("mix", help="mix fine-tuned models (FFT-MoE) or LoRA adapters (LoRA-MoE) of one base "
                                   "into a mixture of experts", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="routers (--router):\n" + "\n".join(f"  {name:<12} {line}"
                                                                   for name, line in MOE_ROUTERS.items()))
    p.add_argument("--base", required=True, help="the base model dir")
    p.add_argument("--models", nargs="+", required=True, help="model dirs (FFT-MoE) or PEFT LoRA adapter dirs")
    p.add_argument("--top-k", type=int, default=moe.top_k, help=f"experts per token (default {moe.top_k})")
    p.add_argument("--layers", nargs="+", type=int, help="the layers to mix (default: all)")
    p.add_argument("--shared", choices=["base", "average"], default=moe.shared,
                   help="FFT-MoE: attention, norms and embeddings from the base or the models' average")
    p.add_argument("--base-expert", choices=["none", "routed", "always-on"], default=moe.base_expert,
                   help="the base as a routed expert, or always active (FFT-MoE)")
    p.add_argument("--attention", nargs="+", choices=["q_proj", "k_proj", "v_proj", "o_proj"],
                   help="FFT-MoE: these self-attention projections are experts too, each with its own router")
    p.add_argument("--router", choices=list(MOE_ROUTERS),
                   help="router init (default: prompts if --prompts is given, else random); each is listed below")
    p.add_argument("--preset", choices=list(MOE_PRESETS),
                   help="btx: Branch-Train-MiX (FFT-MoE, --shared average, a random router trained top-k with the "
                        "load-balancing loss on --train-data, --train-steps default "
                        f"{RouterTrainingConfig().steps})")
    p.add_argument("--routing", choices=["layer", "module"],
                   help="LoRA-MoE: a router per layer, or per module reading the module's input (default: module "
                        "for arrow, layer otherwise)")
    p.add_argument("--temperature", type=float, help="the arrow router's softmax temperature (default 1)")
    p.add_argument("--prompts", nargs="+", help="one JSON/JSONL file of prompts per model, in order")
    p.add_argument("--prompts-per-expert", type=int, default=moe.prompts_per_expert,
                   help=f"prompts used from each file (default {moe.prompts_per_expert})")
    p.add_argument("--train-data", nargs="+", help="router training: TRACE-format files of prompt/answer items")
    # --router-steps / --router-lr: the names `compose` gives the same settings
    p.add_argument("--train-steps", "--router-steps", type=int, default=0,
                   help="router training steps (default 0: none)")
    p.add_argument("--train-lr", "--router-lr", type=float, default=routers.lr,
                   help=f"router training's learning rate (default {routers.lr})")
    p.add_argument("--train-batch-size", type=int, default=routers.batch_size, help=f"default {routers.batch_size}")
    p.add_argument("--aux-loss-coef", type=float, default=routers.aux_loss_coef,
                   help=f"weight of the load-balancing loss (default {routers.aux_loss_coef})")
    p.add_argument("--seed", type=int, default=0, help="random routers and the training order")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output shard (FFT-MoE)")
    add_dtype_option(p, "the mixture's weights (a LoRA-MoE's experts; auto: the adapters' own)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_mix)

    p = sub.add_parser("gate", help="train the gates of your LoRA adapter on your data (PHATGOOSE), written into "
                                    "the adapter dir for `mix --router gates`")
    p.add_argument("--base", required=True, help="the base model dir")
    p.add_argument("--adapter", required=True, help="your PEFT LoRA adapter dir (the gates are written into it)")
    p.add_argument("--train-data", nargs="+", required=True, help="TRACE-format files of prompt/answer items")
    p.add_argument("--steps", type=int, help="default 100")
    p.add_argument("--lr", type=float, help="default 1e-3")
    p.add_argument("--batch-size", type=int, help="default 8")
    p.add_argument("--max-length", type=int, help="default: the training recipe's")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("build-world", help="build the built-in world (base model, tokenizer, tasks)")
    p.add_argument("--preset", choices=["test", "quick", "full"], default="quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_build_world)

