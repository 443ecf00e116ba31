"""Commands of a whole study: study, demo, report, advise."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from knowstack.cli.common import console, percent
from knowstack.cli.vocabulary import meaning
from knowstack.config import CONFIG_DIR, SearchConfig
from knowstack.errors import InputProblems, KnowstackError, Problem


@contextlib.contextmanager
def naming_the_config(config: str | Path) -> Iterator[None]:
    """An error about a setting that names no file (one the plan finds, e.g. old_knowledge.limit for a search, or one
    of the study's input checks, e.g. an FFT-MoE setting its base cannot take) names the config file, as the config's
    own checks do."""
    try:
        yield
    except InputProblems as err:
        named = [Problem(str(config), p.message, p.field, p.item) if p.path is None and p.field else p
                 for p in err.problems]
        if named == err.problems:
            raise
        raise InputProblems(named) from None
    except KnowstackError as err:
        if type(err) is not KnowstackError or err.path is not None or err.field is None:
            raise
        raise KnowstackError(err.message, path=config, field=err.field, item=err.item) from None


def cmd_study(args: argparse.Namespace) -> None:
    with naming_the_config(args.config):
        _run_or_plan(args)


def _run_or_plan(args: argparse.Namespace) -> None:
    from knowstack import api

    if args.dry_run:
        api.dry_run(args.config, args.out, gpu_memory_gib=args.gpu_memory, console=console,
                    shared_cache=False if args.no_shared_cache else None)
        return
    # `demo` reaches here too, without the study command's executor options
    results = api.run_study(args.config, args.out, executor=getattr(args, "executor", "local"),
                            address=getattr(args, "address", None), console=console,
                            jobs=getattr(args, "jobs", None), threads=getattr(args, "threads", None),
                            shared_cache=False if getattr(args, "no_shared_cache", False) else None)
    # The page last: `make demo` ends with the path to open.
    print(f"results: {results.results_csv.resolve()}\nreport:  {results.report.resolve()}")


def _shared_cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-shared-cache", action="store_true", help=meaning("--no-shared-cache"))


def cmd_cache(args: argparse.Namespace) -> None:
    from knowstack.study.shared_cache import collect_garbage, default_root, entries

    root = default_root()
    if args.action == "where":
        print(root)
        return
    if args.action == "size":
        found = entries(root)
        unlinked = [e for e in found if not e.linked]
        print(f"{root}: {len(found)} steps, {sum(e.bytes for e in found) / 2**20:.1f} MiB; "
              f"{len(unlinked)} linked by no study dir ({sum(e.bytes for e in unlinked) / 2**20:.1f} MiB, "
              "`knowstack cache gc` removes them)")
        return
    removed = collect_garbage(root)
    print(f"{root}: removed {len(removed)} steps no study dir links, {sum(e.bytes for e in removed) / 2**20:.1f} MiB")


def cmd_demo(args: argparse.Namespace) -> None:
    args.config = str(CONFIG_DIR / "builtin-quick.yaml")
    args.dry_run = False
    cmd_study(args)


def _study_results(directory: str):  # -> api.StudyResults
    """A study dir's plan and its results so far; one clear error when it is not a study dir or has none."""
    from knowstack import api

    out = Path(directory)
    if not (out / "config.yaml").is_file():
        raise KnowstackError("not a study dir (no config.yaml): run `knowstack study CONFIG --out DIR` first",
                             path=out)
    results = api.study_results(out)
    if not results.rows:
        raise KnowstackError("no results yet: no evaluation of this study has finished", path=out)
    return results


def cmd_report(args: argparse.Namespace) -> None:
    path = _study_results(args.dir).write_report()
    print(f"markdown: {path.with_name('report.md').resolve()}\nreport:   {path.resolve()}")


def cmd_advise(args: argparse.Namespace) -> None:
    from knowstack import api
    from knowstack.registry.core import is_url
    from knowstack.registry.db import DB_FILE

    if is_url(args.dir) or (Path(args.dir) / DB_FILE).is_file():
        from knowstack.registry.advice import registry_advice

        with api.open_registry(args.dir) as reg:
            print(registry_advice(reg, args.max_old_loss, args.setting))
        return
    from knowstack.report.build import study_advice
    from knowstack.study.results import current_items

    results = _study_results(args.dir)
    plan = results.plan
    print(study_advice(results.rows, plan.task_names, args.max_old_loss, args.setting or "semi",
                       plan.config.old_knowledge.metric, current_items(plan, Path(args.dir))))


def add_commands(sub: Any) -> None:
    p = sub.add_parser("study", help="run a study from a YAML config (resumes where it stopped)")
    p.add_argument("config", help="the study's YAML config (docs/config.md)")
    p.add_argument("--out", required=True, help=meaning("--out", "the study dir (artifacts, results.csv, report.html)"))
    p.add_argument("--dry-run", action="store_true", help=meaning(
        "--dry-run", "print the plan, which steps are done (or would be linked from the shared step cache), and each "
                     "step's estimated GPU memory and GPUs"))
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where steps run: here in plan order (local), or as Ray tasks, each ready step at once (ray)")
    p.add_argument("--address", help="ray: the cluster to join ('auto', 'HOST:6379', 'ray://HOST:10001'); "
                                     "default: start a local Ray")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="dry run: GiB per GPU (default 80)")
    p.add_argument("--jobs", type=int, help="local: steps at once, the cores divided between them (default: the "
                                            "config's executor.jobs, 1 unless set); 1: one after another on every core; "
                                            "more: faster, but other float sums (docs/config.md)")
    p.add_argument("--threads", help="local, with --jobs above 1: torch threads of each step (default: the config's "
                                     "executor.threads, share unless set): share (cores // jobs), all (the threads, so "
                                     "the numbers, of --jobs 1) or a number")
    _shared_cache_option(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("demo", help="the quick built-in study (configs/builtin-quick.yaml)")
    p.add_argument("--out", default="runs/demo", help=meaning("--out", "the study dir (default runs/demo)"))
    _shared_cache_option(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("cache", help="the shared step cache studies link finished steps from (KNOWSTACK_CACHE)")
    p.add_argument("action", choices=["where", "size", "gc"], help="where: its dir; size: its entries and bytes; "
                                                                   "gc: remove the entries no study dir links")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("report", help="write a study dir's report (report.html, report.md, figures/, tables/) "
                                      "from its results; a study still running reports what has finished")
    p.add_argument("dir", help="the study dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("advise", help="which method to use: the measured setting that learns the most within a "
                                      "limit on old-knowledge loss")
    p.add_argument("dir", help="a study dir, or a registry (advice for its next version, from its history)")
    budget = SearchConfig().max_old_loss  # the one budget (config.py), as a search's
    p.add_argument("--max-old-loss", type=percent, default=budget,
                   help=meaning("--max-old-loss", f"{budget:g}%% (a bare number below 1 is refused as ambiguous; "
                                                  f"default {budget:g}%%)"))
    p.add_argument("--setting", choices=["semi", "full"],
                   help="semi: the contributors share models only; full: their training data too (default: semi; "
                        "a registry: full when every contribution kept its data)")
    p.set_defaults(func=cmd_advise)

