"""Command-line options derived from the config's declarations, so that a CLI default cannot differ from a
study's: each option defaults to "not given", and the value is built by the config model itself (its default,
its checks, its error naming the option)."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from knowstack.cli.vocabulary import MEANINGS, add_deprecated, meaning
from knowstack.errors import KnowstackError


def _flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def _dest(prefix: str, name: str) -> str:
    return (prefix + name).replace("-", "_")


def _plain(annotation: Any) -> tuple[Any, bool]:
    """The type under Optional[...], and whether None was allowed."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _argparse_kwargs(annotation: Any) -> dict[str, Any] | None:
    """How argparse reads one field; None for a field with no command-line form (a nested model, a mapping)."""
    kind, _ = _plain(annotation)
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(kind))}
    if origin is list:
        (item,) = typing.get_args(kind) or (str,)
        inner = _argparse_kwargs(item)
        return None if inner is None else {"nargs": "+", **inner}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if kind in (int, float, str):
        return {"type": kind}
    if typing.get_origin(kind) is typing.Annotated:
        return _argparse_kwargs(typing.get_args(kind)[0])
    return None


def add_model_options(group: Any, model: type[BaseModel], *, prefix: str = "", only: tuple[str, ...] | None = None,
                      helps: dict[str, str] | None = None) -> None:
    """One option per field of `model` (or of the fields named in `only`): `--<prefix><field>`, default not given,
    its help ending with the declared default."""
    helps = helps or {}
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        kwargs = _argparse_kwargs(field.annotation)
        if kwargs is None:
            continue
        default = field.get_default(call_default_factory=True)
        shown = "not set" if default is None else " ".join(map(str, default)) if isinstance(default, list) else default
        text = helps.get(name, field.description or "")
        text = text if "(default" in text else f"{text} (default {shown})".strip()
        group.add_argument(_flag(prefix, field.alias or name), dest=_dest(prefix, name), default=None,
                           help=text.replace("%", "%%"), **kwargs)


def given_options(args: argparse.Namespace, model: type[BaseModel], *, prefix: str = "") -> dict[str, Any]:
    """The fields of `model` given on the command line (by their field names)."""
    values = {}
    for name in model.model_fields:
        value = getattr(args, _dest(prefix, name), None)
        if value is not None:
            values[name] = value
    return values


def model_from_args(model: type[BaseModel], values: dict[str, Any], *, prefix: str = "") -> Any:
    """The model built from command-line values: its defaults for the rest, its checks, one error naming the option."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        location = [str(part) for part in first["loc"] if not isinstance(part, int)]
        option = _flag(prefix, location[-1]) if location else None
        raise KnowstackError(first["msg"].removeprefix("Value error, "), field=option) from None


# The recipe's settings `knowstack train` takes as options (report_to and add_pad_token are a study's: the grown base
# is a step of its own); LoRA's are --lora-r, --lora-alpha, ... On a built-in world's model the defaults are the
# world's recipe (builtin/world.py world_recipe).
TRAINING_OPTIONS = ("lr", "lr_of_pretrain_peak", "schedule", "warmup_steps", "epochs", "max_steps", "batch_size",
                    "micro_batch_size", "max_length", "weight_decay", "max_grad_norm", "pack", "precision",
                    "loss_reduction", "overlong")
TRAINING_HELP = {"lr": f"{MEANINGS['--lr']} (default 2e-05, the paper's; on a built-in world's model: the world's "
                       "recipe)",
                 "lr_of_pretrain_peak": "learning rate as a fraction of a built-in world's pretraining peak rate "
                                        "(world.json), as a study's training.lr_of_pretrain_peak (default on a world's "
                                        "model: its recipe's)",
                 "batch_size": MEANINGS["--batch-size"],
                 "micro_batch_size": MEANINGS["--micro-batch-size"], "max_length": MEANINGS["--max-length"],
                 "epochs": MEANINGS["--epochs"], "schedule": "the learning rate's schedule after warmup",
                 "warmup_steps": "optimizer steps of linear warmup", "max_steps": "stop after this many optimizer "
                 "steps (default: all of --epochs)", "weight_decay": "AdamW's weight decay",
                 "max_grad_norm": "gradients clipped to this norm", "pack": "pack several examples into one "
                 "sequence of --max-length tokens",
                 "precision": "how the weights train, as a study's training.precision: float32 master weights, or bf16 "
                              "(the weights and AdamW's state in bfloat16, the paper's script)",
                 "loss_reduction": "a step's loss, as a study's training.loss_reduction: token (one mean over the "
                                   "batch's answer tokens) or micro_batch (the mean of the micro-batches' means, the "
                                   "paper's Trainer)",
                 "overlong": "an example longer than --max-length, as a study's training.overlong: keep-answer cuts "
                             "the prompt's middle and drops one whose answer does not fit alone; paper cuts as the "
                             "paper's collator (a long answer loses its end)"}
LORA_HELP = {"r": MEANINGS["--lora-r"], "alpha": MEANINGS["--lora-alpha"], "dropout": "LoRA's dropout",
             "target_modules": "the modules LoRA adapts (names of linear layers)"}


def add_training_options(parser: Any, *, only: tuple[str, ...] = TRAINING_OPTIONS) -> None:
    """The training recipe's options, from config.py's TrainingConfig and LoraConfig (their defaults, their checks)."""
    from knowstack.config import LoraConfig, TrainingConfig

    add_model_options(parser, TrainingConfig, only=only, helps=TRAINING_HELP)
    add_model_options(parser, LoraConfig, prefix="lora_", helps=LORA_HELP)


def training_from_args(args: argparse.Namespace, recipe: dict[str, Any] | None = None,
                       **fixed: Any):  # -> TrainingConfig
    """The recipe the options give, over `recipe` (a `training:` section: a built-in world's) where given; `fixed`:
    settings given another way (compose's --train-batch-size)."""
    from knowstack.config import LoraConfig, TrainingConfig

    base = dict(recipe or {})
    given = {k: v for k, v in given_options(args, TrainingConfig).items() if k in TRAINING_OPTIONS}
    if {"lr", "lr_of_pretrain_peak"} & given.keys():  # a rate given either way replaces the recipe's
        base.pop("lr", None)
        base.pop("lr_of_pretrain_peak", None)
    lora = model_from_args(LoraConfig, {**base.pop("lora", {}), **given_options(args, LoraConfig, prefix="lora_")},
                           prefix="lora_")
    fixed = {k: v for k, v in fixed.items() if v is not None}
    return model_from_args(TrainingConfig, {**base, **given, **fixed, "lora": lora})



def add_merge_method_options(parser: Any) -> None:
    """The merge methods' options (`knowstack merge` and `compose`), one per option combine/merges/ declares (its
    meaning, type, the methods that read it, its default), default not given: MergeConfig, made from the same
    declarations, fills and checks them (`merge_options_given`)."""
    from knowstack.combine.merges import METHODS, OPTIONS, option_flag

    for name, option in OPTIONS.items():
        readers = [method.name for method in METHODS.values() if name in method.options]
        detail = "read by " + ", ".join(readers)
        if name == "density":  # DARE takes mergekit's and PEFT's density, the fraction kept (base.py options_from)
            dare = [method.name for method in METHODS.values() if method.takes_density_for_drop_rate]
            detail += f"; for DARE ({', '.join(dare)}) what mergekit and PEFT mean by it, 1 - --drop-rate"
        parser.add_argument(option_flag(name), dest=option.field, metavar=name.upper(), type=option.type, default=None,
                            help=meaning(option_flag(name), f"{detail} (default {option.default:g})"))


def merge_options_given(args: argparse.Namespace) -> dict[str, Any]:
    """The merge options given on the command line, by attribute (`lam`); MergeOptions checks them against their
    declared ranges."""
    from knowstack.combine.merges import OPTIONS

    return {option.field: getattr(args, option.field) for option in OPTIONS.values()
            if getattr(args, option.field, None) is not None}


def add_lora_moe_router_options(parser: Any) -> None:
    """--router-dtype and --router-init (`mix` and `compose`): a LoRA-MoE's router_dtype and router_init, their choices
    the config's (RouterDtype, RouterInit), default not given (the config's own)."""
    from knowstack.config import RouterDtype, RouterInit

    parser.add_argument("--router-dtype", choices=typing.get_args(RouterDtype), help=meaning("--router-dtype"))
    parser.add_argument("--router-init", choices=typing.get_args(RouterInit), help=meaning("--router-init"))


def add_out_option(parser: Any, what: str, *, required: bool = True, default: str | None = None) -> None:
    """--out of a dir the command writes whole, and --overwrite to replace one that is not empty (validate.py
    check_out_dir)."""
    parser.add_argument("--out", required=required, default=default,
                        help=meaning("--out", f"{what}: a new or empty dir (an existing one only with --overwrite)"))
    parser.add_argument("--overwrite", action="store_true",
                        help=meaning("--overwrite", "when it is not empty (never an input of the command)"))


def add_dtype_option(parser: Any, what: str) -> None:
    """--dtype of an output's weights (merge, mix): the base's unless another is asked for."""
    from knowstack.modelio import DTYPE_CHOICES

    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help=meaning("--dtype", f"{what} (default auto: the base's)"))


def add_eval_batch_size(parser: Any, *, old_name: bool = True) -> None:
    """--eval-batch-size (an evaluation's batch, default config.py's EVAL_BATCH_SIZE); --batch-size, its old name in
    the commands that do not train."""
    from knowstack.config import EVAL_BATCH_SIZE as default

    option = parser.add_argument("--eval-batch-size", type=int, default=default,
                                 help=f"{meaning('--eval-batch-size')} (default {default})")
    if old_name:
        add_deprecated(parser, "--batch-size", option)


def add_protocol_option(parser: Any, detail: str = "") -> None:
    """--protocol: how new-knowledge answers are read and scored (config.py's PROTOCOLS, DEFAULT_PROTOCOL)."""
    from knowstack.config import DEFAULT_PROTOCOL, PROTOCOLS

    parser.add_argument("--protocol", choices=list(PROTOCOLS), default=DEFAULT_PROTOCOL,
                        help=f"{meaning('--protocol', detail)} (default {DEFAULT_PROTOCOL})")


def add_json_option(parser: Any, what: str = "") -> None:
    """--json: the command's results as JSON on stdout (text by default)."""
    parser.add_argument("--json", action="store_true", help=meaning("--json", what))


def print_result(args: argparse.Namespace, result: Any, text: str) -> None:
    """A command's results on stdout: `text`, or with --json the result as one JSON object."""
    import json

    print(json.dumps(result) if getattr(args, "json", False) else text)
