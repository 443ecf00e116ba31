"""Commands of one model at a time: train, eval, score, merge, extract-lora, statistics, mix, build-world."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from knowstack.cli.common import console
from knowstack.cli.metric import add_metric_option, metric_problems
from knowstack.cli.options import (
    add_dtype_option,
    add_eval_batch_size,
    add_json_option,
    add_lora_moe_router_options,
    add_merge_method_options,
    add_out_option,
    add_protocol_option,
    add_training_options,
    merge_options_given,
    print_result,
    training_from_args,
)
from knowstack.cli.vocabulary import add_deprecated, meaning, positional_or_option
from knowstack.config import (
    MOE_PRESETS,
    MOE_ROUTERS,
    MoeConfig,
    RouterTrainingConfig,
)
from knowstack.errors import KnowstackError, Problem


def _task_dir_or_file(args: argparse.Namespace) -> str | None:
    """What defines the task given: --task, or the file a command reads without one."""
    return args.task or getattr(args, "test_file", None) or getattr(args, "train_file", None)


def _task_from_args(args: argparse.Namespace, metric: str):
    from knowstack.config import TaskConfig
    from knowstack.data.tasks import task_from_config

    fields = {"name": Path(args.task or args.train_file).stem, "format": args.format, "metric": metric}
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
    if given:
        return check_split_file(given, args.format, split)
    # an evaluation may score old knowledge alone (cmd_eval says when it has nothing); training needs data
    return [Problem(None, "nothing to train on: give --task (a task dir) or --train-file", field="--task")] \
        if split == "train" else []


def cmd_train(args: argparse.Namespace) -> None:
    """One round of training, as a study step does it: plain, with replay of earlier tasks, or O-LoRA."""
    from knowstack import api
    from knowstack.validate import (
        check_adapter_dir,
        check_lora_targets,
        check_model_dir,
        check_out_dir,
        check_task_dir,
        raise_problems,
    )

    if args.olora_previous and args.finetune != "lora":
        raise KnowstackError("--olora-previous is O-LoRA: it needs --finetune lora")
    problems = check_out_dir(args.out, overwrite=args.overwrite, inputs=[
        args.model, args.task, args.train_file, args.test_file, args.tokenizer, *(args.replay or []),
        *(args.olora_previous or [])])
    problems += check_model_dir(args.model) + _task_arg_problems(args, "train")
    for path in args.replay or []:
        problems += check_task_dir(path, required=("train",), optional=())
    for path in args.olora_previous or []:
        problems += check_adapter_dir(path)
    raise_problems(problems)
    training = _training_of(args)
    if args.finetune == "lora":  # read from the checked model dir's weights' names
        raise_problems(check_lora_targets(args.model, training.lora.target_modules))
    task = _task_from_args(args, args.metric or "accuracy")  # training reads no metric
    summary = api.train(args.model, task, args.out, finetune=args.finetune,
                        training=training, seed=args.seed, replay=args.replay or (),
                        replay_fraction=args.replay_fraction, olora_previous=args.olora_previous or (),
                        olora_lambda=args.olora_lambda, tokenizer=args.tokenizer,
                        trust_remote_code=args.trust_remote_code)
    result = {**{k: summary[k] for k in ("steps", "examples") if k in summary}, "out": str(args.out)}
    print_result(args, result, f"trained: {result.get('steps', '?')} steps on {result.get('examples', '?')} "
                               f"examples\nwritten: {args.out}")
    _warn_if_loss_did_not_fall(summary)


def _training_of(args: argparse.Namespace):  # -> TrainingConfig
    """train's recipe: the options over, on a built-in world's model, the world's recipe (said on stderr), where
    the paper's rate for an 8B model would teach a tiny model nothing."""
    from knowstack.builtin.world import world_of_model, world_recipe

    world = world_of_model(args.model)
    if world is None:
        if args.lr_of_pretrain_peak is not None:
            raise KnowstackError("--lr-of-pretrain-peak is a fraction of a built-in world's pretraining peak rate: "
                                 "--model is not a world's model (WORLD/model beside world.json); give --lr")
        return training_from_args(args)
    source, recipe = world_recipe(world)
    training = training_from_args(args, recipe=recipe)
    peak = world["pretrain"]["peak_lr"]
    rate = f"lr {training.learning_rate(peak):.3g}" + (f" ({training.lr_of_pretrain_peak:g} x the pretraining peak "
                                                       f"{peak:g})" if training.lr is None else "")
    console.print(f"train: a built-in world's model: its recipe (configs/{source}, under the options given): {rate}, "
                  f"{training.epochs:g} epochs, batch {training.batch_size}, max length {training.max_length}",
                  highlight=False)
    return training


def _warn_if_loss_did_not_fall(summary: dict[str, Any]) -> None:
    from knowstack.train.loop import loss_fell

    curve = summary.get("loss_curve") or []
    if loss_fell(curve) is False:
        console.print(f"warning: the training loss did not fall ({curve[0]:.4f} -> {curve[-1]:.4f} in {len(curve)} "
                      f"steps at lr {summary['settings']['lr']:.3g}): the model learned little; try another --lr "
                      "(or --lr-of-pretrain-peak on a built-in world's model)", highlight=False)


def cmd_eval(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.data.tasks import task_metric
    from knowstack.validate import check_adapter_dir, check_model_dir, check_old_tasks, raise_problems

    problems = check_model_dir(args.model, adapter_hint="--model BASE --adapter {path}")
    problems += check_adapter_dir(args.adapter) if args.adapter else []
    if args.task or args.test_file:
        problems += _task_arg_problems(args, "test") or metric_problems(_task_dir_or_file(args), args.metric,
                                                                         args.format)
    if args.old_tasks or args.include_path:
        problems += check_old_tasks(args.old_tasks, args.include_path, field="--old-tasks",
                                    include_field="--include-path")
    raise_problems(problems)
    if not (args.task or args.test_file or args.old_tasks):
        raise KnowstackError("nothing to evaluate: give --task/--test-file or --old-tasks")
    task = None
    if args.task or args.test_file:
        chosen = task_metric(_task_dir_or_file(args), given=args.metric, task_format=args.format)
        task = _task_from_args(args, chosen.metric)
        console.print(f"{task.name}: metric {chosen.metric} (from {chosen.source})", markup=False, highlight=False)
    result = api.evaluate(args.model, adapter=args.adapter, tasks={task.name: task} if task else None,
                          old_tasks=args.old_tasks, include_path=args.include_path, limit=args.limit,
                          eval_batch_size=args.eval_batch_size, protocol=args.protocol)
    text = json.dumps(result, indent=2)
    if args.out:
        from knowstack.atomic import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")
    print_result(args, result, "\n".join(f"{task} {metric}: {value:.4f}" for task, scores in result.items()
                                         for metric, value in scores.items()))


def cmd_score(args: argparse.Namespace) -> None:
    """Scores of predictions made elsewhere, with the same reading and metrics as a study's evaluation."""
    from knowstack import api
    from knowstack.data.tasks import task_metric

    positional_or_option(args, "task", "--task")
    where = Path(args.task)
    chosen = task_metric(where, given=args.metric, task_format=args.format)  # as eval reads it: one resolver
    score = api.score_predictions(where, Path(args.predictions), metric=chosen.metric, task_format=args.format,
                                  protocol=args.protocol)
    if args.out:
        from knowstack.atomic import atomic_write_text

        atomic_write_text(Path(args.out), "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                                  for row in score.predictions))
    if args.json:
        print(json.dumps(score.scores))
        return
    for metric, value in score.scores.items():
        print(f"{metric}: {value:.4f}  (n={score.n}, protocol {args.protocol}, metric from {chosen.source})")
    if args.out:
        print(f"written: {args.out}")


def cmd_merge(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.validate import check_model_dir, check_out_dir, check_weights_dir, raise_problems

    problems = check_out_dir(args.out, overwrite=args.overwrite,
                             inputs=[args.base, *args.models, *(args.statistics or [])])
    problems += check_model_dir(args.base, tokenizer=False) if args.base else []
    raise_problems(problems + [p for path in args.models for p in check_weights_dir(path)])
    out = api.merge(args.method, args.models, args.out, base=args.base, weights=args.weights,
                    lora_space=args.lora_space, seed=args.seed, max_shard_gb=args.max_shard_gb, progress=True,
                    statistics=args.statistics, dtype=args.dtype, input_hashes=args.input_hashes,
                    **merge_options_given(args))
    record = json.loads((out / "merge.json").read_text(encoding="utf-8"))
    print_result(args, {**record, "out": str(out)}, f"merged model: {out}")


def cmd_extract_lora(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.validate import check_model_dir, check_out_dir, raise_problems

    problems = check_out_dir(args.out, overwrite=args.overwrite, inputs=[args.base, args.model])
    problems += check_model_dir(args.base, tokenizer=False)
    problems += check_model_dir(args.model, tokenizer=False, adapter_hint="an adapter already: it needs no extracting")
    raise_problems(problems)
    record = api.extract_lora(args.base, args.model, args.out, rank=args.rank, target_modules=args.target_modules,
                              progress=True)
    width = max((len(name) for name in record["modules"]), default=0)
    lines = [f"{name:<{width}}  rank {m['rank']:>4}  explained {m['explained']:7.2%}"
             for name, m in record["modules"].items()]
    lines.append(f"explained: {record['explained']:.2%} of the extracted modules' delta energy, "
                 f"{record['explained_of_whole_delta']:.2%} of the whole delta's")
    if record["not_extracted"]:
        lines.append("not extracted (share of the whole delta): " + ", ".join(
            f"{kind} {share:.2%}" for kind, share in record["not_extracted"].items()))
    lines.append(f"LoRA adapter: {args.out}")
    print_result(args, {**record, "out": str(args.out)}, "\n".join(lines))


def cmd_statistics(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.validate import check_out_dir, raise_problems

    positional_or_option(args, "model", "--model")
    if args.train_data is None:
        raise KnowstackError("give the model's training data (--train-data FILE)", field="--train-data")
    raise_problems(check_out_dir(args.out, overwrite=args.overwrite,
                                 inputs=[args.model, args.train_data, args.base, args.tokenizer]))
    out = api.statistics(args.model, args.train_data, args.out, base=args.base, kinds=args.kind, examples=args.examples,
                         max_length=args.max_length, tokenizer=args.tokenizer,
                         trust_remote_code=args.trust_remote_code)
    record = json.loads((out / "statistics.json").read_text(encoding="utf-8"))
    print_result(args, {**record, "out": str(out)}, "\n".join(
        [f"{kind}: {entry['examples']} examples, {entry['tokens']} tokens"
         for kind, entry in record["statistics"].items()] + [f"statistics: {out}"]))


def cmd_mix(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.validate import (
        check_model_dir,
        check_out_dir,
        check_prompt_file,
        check_split_file,
        check_weights_dir,
        raise_problems,
    )

    problems = check_out_dir(args.out, overwrite=args.overwrite,
                             inputs=[args.base, *args.models, *(args.prompts or []), *(args.train_data or [])])
    problems += check_model_dir(args.base, tokenizer=bool(args.prompts or args.train_data))
    problems += [p for path in args.models for p in check_weights_dir(path)]
    problems += [p for path in args.prompts or [] for p in check_prompt_file(path)]
    problems += [p for path in args.train_data or [] for p in check_split_file(path, "trace", "train")]
    raise_problems(problems)
    shared, router, train_steps = args.shared, args.router, args.router_steps
    if args.preset is not None:  # the preset's settings where the command line leaves them open
        preset = MOE_PRESETS[args.preset]
        shared, router = preset["shared"], router or preset["router"]
        if "router_training" in preset:
            if not args.train_data:
                raise KnowstackError(f"--preset {args.preset} trains the routers: give --train-data", field="train_data")
            train_steps = train_steps or RouterTrainingConfig().steps
    if args.train_data and not train_steps:
        raise KnowstackError("--train-data is for router training: give --router-steps too")
    if not router and not args.prompts:  # the default a study and compose take needs prompts: never a silent other
        # --router-init moetify is moetify's router's: point there, not to a router that init would then refuse
        example = "moetify, which --router-init moetify draws" if args.router_init == "moetify" else "random"
        raise KnowstackError(f"the default router, {MoeConfig().router} as in a study and compose, is built from each "
                             f"model's prompts: give --prompts (one file per model), or name a --router (e.g. {example})")
    router = router or MoeConfig().router
    record = api.mix(args.base, args.models, args.out, prompts=args.prompts, prompts_per_expert=args.prompts_per_expert,
                     train_data=args.train_data or (), router_steps=train_steps, router_lr=args.router_lr,
                     router_batch_size=args.router_batch_size, aux_loss_coef=args.aux_loss_coef,
                     max_shard_gb=args.max_shard_gb, top_k=args.top_k, layers=args.layers, shared=shared,
                     base_expert=args.base_expert, router=router, seed=args.seed,
                     attention=args.attention or (), routing=args.routing, temperature=args.temperature,
                     dtype=args.dtype, router_dtype=args.router_dtype, router_init=args.router_init)
    if args.json:
        print(json.dumps({**record, "out": str(args.out)}))
        return
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
    if args.json:
        print(json.dumps(summary))
        return
    print(f"gates of {summary['modules']} modules, loss {summary['first']} -> {summary['last']} in "
          f"{summary['steps']} steps: {summary['file']}")


def cmd_build_world(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.validate import check_out_dir, raise_problems

    raise_problems(check_out_dir(args.out, overwrite=args.overwrite))
    path = api.build_world(args.out, preset=args.preset, seed=args.seed)
    print(f"built-in world: {path}")


def _add_task_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", help=meaning("--task"))
    parser.add_argument("--format", choices=["trace", "math"], default="trace", help=meaning("--format"))
    parser.add_argument("--train-file", help=meaning("--train-file"))
    parser.add_argument("--test-file", help=meaning("--test-file"))
    add_metric_option(parser)


def add_commands(sub: Any) -> None:
    from typing import get_args

    from knowstack.combine.merges import mergekit_aliases
    from knowstack.config import (
        GateTrainingConfig,
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
    p.add_argument("--model", required=True, help=meaning("--model", "to start from (or a hub id)"))
    _add_task_args(p)
    p.add_argument("--finetune", choices=["fft", "lora"], default="lora", help=f"{meaning('--finetune')} (default lora)")
    p.add_argument("--tokenizer", help=meaning("--tokenizer", "as a study's base.tokenizer"))
    p.add_argument("--trust-remote-code", action="store_true", help=meaning("--trust-remote-code"))
    add_training_options(p)
    p.add_argument("--replay", nargs="+", metavar="TASKDIR",
                   help="replay: earlier tasks' dirs; each adds --replay-fraction x |task| of its examples")
    p.add_argument("--replay-fraction", type=float, default=ReplayConfig().fraction,
                   help=f"{meaning('--replay-fraction')} (default {ReplayConfig().fraction})")
    p.add_argument("--olora-previous", nargs="+", metavar="ADAPTER",
                   help="O-LoRA: the earlier rounds' LoRA adapter dirs, penalised against (needs --finetune lora)")
    p.add_argument("--olora-lambda", type=float, default=OLoraConfig().lambdas[0],
                   help=f"{meaning('--olora-lambda')} (default {OLoraConfig().lambdas[0]}, the paper's first run)")
    p.add_argument("--seed", type=int, default=0, help=meaning("--seed", "data order, LoRA init (default 0)"))
    add_out_option(p, "the full model (fft) or PEFT adapter (lora) dir to write")
    add_json_option(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a model (+adapter) on a task and/or lm-eval old-knowledge tasks")
    p.add_argument("--model", required=True, help=meaning("--model", "to score"))
    p.add_argument("--adapter", help=meaning("--adapter", "on top of --model"))
    _add_task_args(p)
    p.add_argument("--old-tasks", nargs="*", default=[], help=meaning("--old-tasks"))
    p.add_argument("--include-path", help=meaning("--include-path"))
    add_eval_batch_size(p)
    p.add_argument("--limit", type=int, help=meaning("--limit"))
    add_protocol_option(p)
    p.add_argument("--out", help=meaning("--out", "the scores as JSON"))
    add_json_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="score predictions made elsewhere (vLLM, another harness) on a task's test "
                                     "split, with the same reading and metrics as `eval`")
    p.add_argument("task_positional", nargs="?", metavar="TASK", help="the task (or --task TASK): a TRACE task dir "
                   "(its test.json), or with --format math a GSM8K-format test file")
    p.add_argument("--task", help=meaning("--task", "as the positional TASK"))
    p.add_argument("--predictions", required=True,
                   help='JSON Lines of {"prediction": ...} in test order, or a JSON list of strings')
    p.add_argument("--format", choices=["trace", "math"], default="trace", help=meaning("--format"))
    add_metric_option(p)
    add_protocol_option(p)
    add_json_option(p, "one JSON object {metric: value}")
    p.add_argument("--out", help=meaning("--out", "one JSON line per test item (prompt, reference, prediction, "
                                                  "answer, scores)"))
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("merge", help="merge fine-tuned models and/or LoRA adapters of one base into one model")
    aliases = mergekit_aliases()
    p.add_argument("--method", required=True, choices=[*get_args(MergeMethodName), *aliases], metavar="METHOD",
                   help=meaning("--method", f"{', '.join(get_args(MergeMethodName))} (docs/methods.md); or mergekit's "
                                f"name for one: {', '.join(f'{old} = {new}' for old, new in aliases.items())}"))
    p.add_argument("--base", help=meaning("--base", "needed by all methods but a plain average of full models"))
    p.add_argument("--models", nargs="+", required=True, help=meaning("--models"))
    p.add_argument("--weights", nargs="+", type=float, help="one positive weight per model (default: equal)")
    add_merge_method_options(p)
    p.add_argument("--statistics", nargs="+", metavar="DIR",
                   help=meaning("--statistics", "regmean, fisher: one dir per model, in the models' order"))
    p.add_argument("--seed", type=int, help=meaning("--seed", "the random drops of dare, ties-dare, della, "
                                                              "della-linear (default 0)"))
    p.add_argument("--lora-space", choices=("delta", "factors"),
                   help="LoRA adapters: merge their deltas s*B@A (delta, the default) or their A and B apart as PEFT's "
                        "add_weighted_adapter does (factors: the paper's LoRA TIES / DARE-TIES; weights are PEFT's, "
                        "1 each by default)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help=f"{meaning('--max-shard-gb')} (default 5)")
    p.add_argument("--no-input-hashes", dest="input_hashes", action="store_false",
                   help="leave the inputs' sha256 out of the model card (which says so): no hashing beside the merge "
                        "(by default they are hashed as the merge reads them, on a thread of their own)")
    add_dtype_option(p, "the merged model's weights")
    add_out_option(p, "the merged model dir to write")
    add_json_option(p, "merge.json's record")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("extract-lora", help="a full fine-tune as a PEFT LoRA adapter: each linear module's delta "
                                            "from the base truncated by SVD to a rank, with the share it explains")
    p.add_argument("--base", required=True, help=meaning("--base", "the fine-tune's"))
    p.add_argument("--model", required=True, help=meaning("--model", "the full fine-tune of --base"))
    p.add_argument("--rank", type=int, required=True, help="the adapter's rank: each module's delta is truncated to "
                                                           "its top RANK singular values")
    p.add_argument("--target-modules", nargs="+", metavar="NAME",
                   help="the linear layers extracted, by Llama's names (a fused family's modules that hold them are "
                        "extracted whole), or `all` for every linear layer, the untied output layer too (default: "
                        "the family's LoRA targets, those training adapts); embeddings never")
    add_out_option(p, "the PEFT adapter dir to write")
    add_json_option(p, "extract_lora.json's record")
    p.set_defaults(func=cmd_extract_lora)

    p = sub.add_parser("statistics", help="statistics of a model's (or adapter's) training data for the regmean and "
                                          "fisher merges, shared instead of the data")
    p.add_argument("model_positional", nargs="?", metavar="MODEL",
                   help="the model (or --model MODEL): a model dir (FFT) or a PEFT LoRA adapter dir (give --base)")
    p.add_argument("--model", help=meaning("--model", "as the positional MODEL"))
    data = p.add_argument("--train-data", help=meaning("--train-data", "one file, the model's (required)"))
    add_deprecated(p, "--data", data)
    p.add_argument("--base", help=meaning("--base", "for an adapter"))
    p.add_argument("--kind", nargs="+", choices=["gram", "fisher"], default=["gram", "fisher"],
                   help="gram: RegMean's input Gram matrices; fisher: the diagonal Fisher (default both)")
    p.add_argument("--examples", type=int, help=f"the first examples used (default {merge.statistics_examples})")
    p.add_argument("--max-length", type=int, help=meaning("--max-length", "as training's max_length (default "
                                                                          f"{TrainingConfig().max_length})"))
    p.add_argument("--tokenizer", help=meaning("--tokenizer", "or the base's, for an adapter"))
    p.add_argument("--trust-remote-code", action="store_true", help=meaning("--trust-remote-code"))
    add_out_option(p, "the statistics dir to write")
    add_json_option(p)
    p.set_defaults(func=cmd_statistics)

    p = sub.add_parser("mix", help="mix fine-tuned models (FFT-MoE) or LoRA adapters (LoRA-MoE) of one base "
                                   "into a mixture of experts", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="routers (--router):\n" + "\n".join(f"  {name:<12} {line}"
                                                                   for name, line in MOE_ROUTERS.items()))
    p.add_argument("--base", required=True, help=meaning("--base"))
    p.add_argument("--models", nargs="+", required=True, help=meaning("--models", "model dirs make an FFT-MoE, "
                                                                                 "adapter dirs a LoRA-MoE"))
    p.add_argument("--top-k", type=int, default=moe.top_k, help=f"{meaning('--top-k')} (default {moe.top_k})")
    p.add_argument("--layers", nargs="+", type=int, help="the layers to mix (default: all)")
    p.add_argument("--shared", choices=["base", "average"], default=moe.shared,
                   help="FFT-MoE: attention, norms and embeddings from the base or the models' average")
    p.add_argument("--base-expert", choices=["none", "routed", "always-on"], default=moe.base_expert,
                   help="the base as a routed expert, or always active (FFT-MoE)")
    p.add_argument("--attention", nargs="+", choices=["q_proj", "k_proj", "v_proj", "o_proj"],
                   help="FFT-MoE: these self-attention projections are experts too, each with its own router")
    p.add_argument("--router", choices=list(MOE_ROUTERS),
                   help=meaning("--router", f"default {moe.router}, as a study's and compose's: from --prompts; "
                                            "each is listed below"))
    p.add_argument("--preset", choices=list(MOE_PRESETS),
                   help=meaning("--preset", "btx: Branch-Train-MiX (FFT-MoE, --shared average, a random router "
                                "trained top-k with the load-balancing loss on --train-data, --router-steps default "
                                f"{RouterTrainingConfig().steps})"))
    p.add_argument("--routing", choices=["layer", "module"],
                   help="LoRA-MoE: a router per layer, or per module reading the module's input (default: module "
                        "for arrow, layer otherwise)")
    p.add_argument("--temperature", type=float, help="the arrow router's softmax temperature (default 1)")
    add_lora_moe_router_options(p)
    p.add_argument("--prompts", nargs="+", help="one JSON/JSONL file of prompts per model, in order")
    p.add_argument("--prompts-per-expert", type=int, default=moe.prompts_per_expert,
                   help=f"{meaning('--prompts-per-expert')} (default {moe.prompts_per_expert})")
    p.add_argument("--train-data", nargs="+", help=meaning("--train-data", "router training's"))
    # config router_training.steps / lr / batch_size; the old --train-* names were also `compose`'s training's
    add_deprecated(p, "--train-steps", p.add_argument("--router-steps", type=int, default=0,
                                                      help=f"{meaning('--router-steps')} (default 0)"))
    add_deprecated(p, "--train-lr", p.add_argument("--router-lr", type=float, default=routers.lr,
                                                   help=f"{meaning('--router-lr')} (default {routers.lr})"))
    add_deprecated(p, "--train-batch-size", p.add_argument(
        "--router-batch-size", type=int, default=routers.batch_size,
        help=f"router training's examples per optimizer step (default {routers.batch_size})"))
    p.add_argument("--aux-loss-coef", type=float, default=routers.aux_loss_coef,
                   help=f"weight of the load-balancing loss (default {routers.aux_loss_coef})")
    p.add_argument("--seed", type=int, default=0, help=meaning("--seed", "random routers and the training order "
                                                                          "(default 0)"))
    p.add_argument("--max-shard-gb", type=float, default=5.0, help=f"{meaning('--max-shard-gb')}: FFT-MoE (default 5)")
    add_dtype_option(p, "the mixture's weights (a LoRA-MoE's experts; auto: the adapters' own)")
    add_out_option(p, "the mixture of experts dir to write")
    add_json_option(p, "moe.json's record")
    p.set_defaults(func=cmd_mix)

    p = sub.add_parser("gate", help="train the gates of your LoRA adapter on your data (PHATGOOSE), written into "
                                    "the adapter dir for `mix --router gates`")
    gates = GateTrainingConfig()
    p.add_argument("--base", required=True, help=meaning("--base"))
    p.add_argument("--adapter", required=True, help=meaning("--adapter", "yours; the gates are written into it"))
    p.add_argument("--train-data", nargs="+", required=True, help=meaning("--train-data", "the adapter's task's"))
    p.add_argument("--steps", type=int, help=f"gate training's optimizer steps (config gate_training.steps; default "
                                             f"{gates.steps})")
    p.add_argument("--lr", type=float, help=f"{meaning('--lr')} (default {gates.lr})")
    p.add_argument("--batch-size", type=int, help=f"{meaning('--batch-size')} (default {gates.batch_size})")
    p.add_argument("--max-length", type=int, help=meaning("--max-length", "default: the training recipe's"))
    p.add_argument("--seed", type=int, default=0, help=meaning("--seed", "the training order (default 0)"))
    add_json_option(p)
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("build-world", help="build the built-in world (base model, tokenizer, tasks)")
    p.add_argument("--preset", choices=["test", "quick", "full"], default="quick",
                   help=meaning("--preset", "the world's size: test (seconds, for tests), quick (the demo's) or full "
                                "(default quick)"))
    p.add_argument("--seed", type=int, default=0, help=meaning("--seed", "the world's data and base model (default 0)"))
    add_out_option(p, "the world dir to write")
    p.set_defaults(func=cmd_build_world)

