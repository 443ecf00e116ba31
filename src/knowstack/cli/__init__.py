"""`knowstack ...`: run a study, or one step of it (train, eval, build-world), or rebuild a report."""

from __future__ import annotations

import argparse
import os
import sys

from rich.markup import escape

from knowstack.cli import models, registry, study
from knowstack.cli.common import console
from knowstack.errors import InputProblems, KnowstackError, Problem, fault_message, os_fault
from knowstack.logs import after_transformers_import, library_messages_to


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knowstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # in this order in `knowstack --help`
    study.add_commands(sub)
    models.add_commands(sub)
    registry.add_commands(sub)
    return parser


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command of `parser` and its parser, by its words ('train', 'registry report'), nested ones too."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:  # argparse keeps its subcommands there; it has no public accessor
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words = f"{prefix}{name}"
                found[words] = sub
                found.update(commands(sub, f"{words} "))
    return found


# A field of the API and of config files named for the options that set it where their names differ (option
# dests); any other field is the option of its own name where the command has one (top_k: --top-k).
FIELD_OPTIONS = {"router_training": ("train_data", "router_steps")}
# Commands whose input is a config file: a field there is the file's, named as in the file.
READ_A_CONFIG = ("study", "demo")


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser | None:
    """The parser of the command that ran (its `func`)."""
    return next((sub for sub in commands(parser).values() if sub.get_default("func") is args.func), None)


def option_of(field: str, parser: argparse.ArgumentParser) -> str | None:
    """The command's option(s) that set `field` ('--train-data/--train-steps'), or None."""
    dests = FIELD_OPTIONS.get(field, (field,))
    from knowstack.cli.vocabulary import DeprecatedAlias

    named = [action.option_strings[0] for dest in dests for action in parser._actions
             if action.dest == dest and action.option_strings and not isinstance(action, DeprecatedAlias)]
    return "/".join(named) or None


def worded_for_command(err: KnowstackError, parser: argparse.ArgumentParser | None, command: str) -> str:
    """The error as the command's user reads it: a field that came from the command line named as its option
    ("option --train-data: ..."), not as the API's or a config file's field ("field 'router_training': ...").
    A problem located in a file keeps its field: the file is where it came from."""
    if parser is None or command in READ_A_CONFIG:
        return str(err)
    problems = err.problems if isinstance(err, InputProblems) else [Problem(err.path, err.message, err.field,
                                                                               err.item)]
    worded = []
    for problem in problems:
        option = option_of(problem.field, parser) if problem.field and problem.path is None else None
        worded.append(Problem(None, f"option {option}: {problem.message}", None, problem.item) if option else problem)
    if worded == problems:
        return str(err)
    return str(InputProblems(worded)) if isinstance(err, InputProblems) else str(worded[0])


def _quiet_libraries() -> None:
    """Per-file loading/saving bars of transformers and datasets drown the study's own progress. transformers' are
    turned off when it is imported: a command that loads no model (a merge) does not pay seconds to import it."""
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    after_transformers_import(_quiet_transformers)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        # Library warnings stay off the console (a study step writes them to its log: knowstack.logs).
        with library_messages_to(None):
            args.func(args)
    except KnowstackError as err:
        # escaped: a path or value in the message (`data/[v2]/train.json`) is text, not rich markup
        message = worded_for_command(err, command_parser(parser, args), args.command)
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: finished steps are kept; run the same command again to resume")
        return 130
    except BrokenPipeError:  # `knowstack log REG | head`: the reader is gone, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        from knowstack.registry.core import is_url

        where = getattr(args, "registry", None) or getattr(args, "dir", None)
        if isinstance(err, OSError) and isinstance(where, str) and is_url(where):
            # A remote store's failures (credentials, no such bucket, network) are the user's to fix, not a bug.
            console.print(f"[red]error:[/red] {where}: the registry's store failed: {err!r}", highlight=False)
            return 2
        fault = os_fault(err)
        if fault is None:
            raise
        return _report_fault(args, fault)
    return 0


# The commands that pick up where they stopped when run again (their finished steps are kept).
RESUMING = ("study", "demo", "compose")


def _report_fault(args: argparse.Namespace, fault: OSError) -> int:
    """A fault of the machine mid-run (disk full, read-only, unreadable): one line naming the path and what to do,
    exit 1; what was being written is left unwritten (knowstack.atomic), never half-written."""
    message = fault_message(fault, getattr(args, "out", None) or getattr(args, "registry", None))
    if args.command in RESUMING:
        message += "; then run the same command again: finished steps are kept"
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return 1

