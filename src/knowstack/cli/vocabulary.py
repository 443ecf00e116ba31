"""One vocabulary for every command: what each option shared by several commands means (its help starts with that
meaning everywhere), the old names kept as deprecated aliases, and the table of docs/commands.md built from the
parsers (`vocabulary_table`; tests/test_vocabulary.py checks that it is current and that no name has two meanings).

The names follow the config's fields: `--batch-size` is training.batch_size (examples per optimizer step),
`--router-steps` / `--router-lr` / `--router-batch-size` are router_training.steps / lr / batch_size,
`--old-tasks` is the API's old_tasks; an evaluation's batch is `--eval-batch-size`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

from knowstack.combine.merges import OPTIONS as MERGE_OPTIONS
from knowstack.combine.merges import option_flag

# option -> its one meaning: the first words of its help in every command that takes it (a command may add ": detail")
MEANINGS: dict[str, str] = {
    "--adapter": "a PEFT LoRA adapter dir",
    "--author": "who made it, recorded with it",
    "--base": "the base model dir",
    "--batch-size": "examples per optimizer step of the training this command runs",
    "--dry-run": "show what would be done, do nothing",
    "--dtype": "dtype of the output's weights",
    "--epochs": "passes over the training data",
    "--eval-batch-size": "examples per evaluation forward pass",
    "--finetune": "fft (a full model) or lora (a LoRA adapter)",
    "--format": "the task's data format: trace (TRACE layout) or math (MetaMathQA train, GSM8K test)",
    "--include-path": "a dir of lm-eval task YAMLs",
    "--json": "print the results as JSON instead of text",
    "--limit": "at most this many examples per task",
    "--lora-alpha": "LoRA's alpha (the update is scaled by alpha / r)",
    "--lora-r": "LoRA's rank",
    "--lr": "learning rate of the training this command runs",
    "--max-length": "tokens per example",
    "--max-old-loss": "how far old knowledge (AVE) may fall below the base's, in percent",
    "--max-shard-gb": "largest output shard, in GB",
    "--method": "the method",
    "--metric": "the task's metric",
    "--micro-batch-size": "examples per forward pass of training",
    "--model": "a model dir",
    "--models": "model dirs and/or PEFT LoRA adapter dirs of one base",
    "--name": "the name of what this command records",
    "--no-shared-cache": "compute every step in the study dir: link nothing from the shared step cache "
                         "(KNOWSTACK_CACHE, default ~/.cache/knowstack/steps) and publish nothing to it",
    "--old-tasks": "lm-eval task names of old knowledge",
    "--olora-lambda": "O-LoRA: the penalty's weight",
    "--out": "where the output is written",
    "--overwrite": "replace --out if it exists",
    "--preset": "a named set of settings",
    "--prompts-per-expert": "prompts used from each expert's prompts",
    "--protocol": "how answers are read and scored (builtin; paper: the paper's TRACE/GSM8K scoring)",
    "--replay-fraction": "replay: each earlier task adds this fraction x |task| of its examples",
    "--router": "router init",
    "--router-dtype": "LoRA-MoE: the dtype its routers are stored in (float32, the default; float16, as moetify saves "
                      "them; or bfloat16), run in float32 on the stored values",
    "--router-init": "--router moetify, LoRA-MoE: how its random routers are drawn: per-module, the default, each "
                     "router from --seed and its module; moetify, as moetify's blend.py draws them on a CPU "
                     "(set_seed(1399), every LoRA layer's init in PEFT's module order, then the routers)",
    "--router-lr": "router training's learning rate",
    "--router-steps": "router training's optimizer steps (0: no router training)",
    "--seed": "random seed",
    "--statistics": "statistics of a model's training data (`knowstack statistics`)",
    "--task": "a task dir (TRACE layout: train.json, eval.json, test.json; with --format math a GSM8K-format test file)",
    "--test-file": "math: a GSM8K-format JSON/JSONL test file",
    "--tokenizer": "the tokenizer, where it is not the model dir's",
    "--top-k": "experts per token",
    "--train-data": "training data: TRACE-format files of prompt/answer items",
    "--train-file": "math: a MetaMathQA-format JSON training file",
    "--trust-remote-code": "run the model repo's own code (off by default)",
    # the merge methods' options: each one's meaning is its declaration's (combine/merges/)
    **{option_flag(name): option.meaning for name, option in MERGE_OPTIONS.items()},
}


def meaning(flag: str, detail: str = "") -> str:
    """The help of a shared option: its one meaning, then what is particular to this command."""
    return f"{MEANINGS[flag]}: {detail}" if detail else MEANINGS[flag]


class DeprecatedAlias(argparse.Action):
    """An old name of an option: stores into the canonical option's dest and says, on stderr, the name to use."""

    def __init__(self, option_strings: list[str], dest: str, canonical: str = "", **kwargs: Any):
        self.canonical = canonical
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"note: {option_string} is deprecated: write {self.canonical}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated(parser: Any, old: str, canonical: argparse.Action) -> None:
    """`old` as a deprecated alias of the option `canonical` (same dest, type and choices; hidden from --help, listed
    in docs/commands.md's vocabulary table). The canonical option cannot be required (argparse would refuse the old
    name): its command checks that one of them was given."""
    if canonical.required:
        raise ValueError(f"{canonical.option_strings[0]} has an old name: make it optional and check it in the command")
    parser.add_argument(old, dest=canonical.dest, canonical=canonical.option_strings[0], action=DeprecatedAlias,
                        type=canonical.type, choices=canonical.choices, nargs=canonical.nargs,
                        metavar=canonical.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def positional_or_option(args: argparse.Namespace, name: str, flag: str) -> None:
    """A command's argument given as a positional (`score TASK`) or as the option other commands take (`--task`):
    one of them, set as args.<name>."""
    from knowstack.errors import KnowstackError

    positional, option = getattr(args, f"{name}_positional", None), getattr(args, name, None)
    if positional is not None and option is not None and positional != option:
        raise KnowstackError(f"give {name.upper()} once: as the positional argument or as {flag}", field=flag)
    if positional is None and option is None:
        raise KnowstackError(f"give {name.upper()} (or {flag} {name.upper()})", field=flag)
    setattr(args, name, option if option is not None else positional)


# --- the table of docs/commands.md ------------------------------------------------------------------------------
def commands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command's name and parser, in `knowstack --help`'s order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}".strip()
                nested = list(commands(sub, full))
                yield from nested or [(full, sub)]


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """A command's options (flags), without --help."""
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            yield action


def vocabulary(parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """option -> {meaning, commands, deprecated: {old: commands}} over every command."""
    table: dict[str, dict[str, Any]] = {}
    for command, sub in commands(parser):
        for action in options(sub):
            if isinstance(action, DeprecatedAlias):
                entry = table.setdefault(action.canonical, {"helps": {}, "commands": [], "deprecated": {}})
                entry["deprecated"].setdefault(action.option_strings[0], []).append(command)
                continue
            flag = action.option_strings[-1] if action.option_strings[0].startswith("-") and \
                not action.option_strings[0].startswith("--") else action.option_strings[0]
            entry = table.setdefault(flag, {"helps": {}, "commands": [], "deprecated": {}})
            entry["commands"].append(command)
            entry["helps"][command] = action.help or ""
    for flag, entry in table.items():
        helps = list(entry["helps"].values())
        entry["meaning"] = MEANINGS.get(flag) or (helps[0] if helps else "")
    return dict(sorted(table.items()))


def vocabulary_table(parser: argparse.ArgumentParser) -> str:
    """docs/commands.md's table: option -> meaning -> commands (old names, deprecated, after)."""
    lines = ["| option | meaning | commands | old names (deprecated) |", "|---|---|---|---|"]
    for flag, entry in vocabulary(parser).items():
        text = entry["meaning"].split(" (default")[0].replace("%%", "%").replace("|", "\\|")
        old = "; ".join(f"`{name}` ({', '.join(where)})" for name, where in entry["deprecated"].items())
        lines.append(f"| `{flag}` | {text} | {', '.join(entry['commands'])} | {old} |")
    return "\n".join(lines)
