"""The --metric option of the commands that score a task dir (eval, score, contribute): one help, one check."""

from __future__ import annotations

import argparse
from pathlib import Path

from knowstack.config import METRICS
from knowstack.data.tasks import TASK_METADATA

METRIC_DETAIL = (f"how the task is scored; default: what defines the task: its {TASK_METADATA} "
               '({"metric": "rouge_l"}), the built-in world\'s world.json, the math format, or TRACE\'s task names '
               "(e.g. MeetingBank: rouge_l); a task none of them defines needs this option")


def add_metric_option(parser: argparse.ArgumentParser) -> None:
    from knowstack.cli.vocabulary import meaning

    parser.add_argument("--metric", choices=list(METRICS), help=meaning("--metric", METRIC_DETAIL))


def metric_problems(task: str | Path | None, metric: str | None, task_format: str) -> list:  # -> list[Problem]
    """The problem, if any, with the task's metric (none defines it, or its knowstack-task.json is bad), listed
    with a command's other input problems before anything runs; ask only of a task whose files passed their checks
    (a missing dir is said once, by those)."""
    from knowstack.data.tasks import task_metric
    from knowstack.validate import problems_of

    return problems_of(lambda: task_metric(task, given=metric, task_format=task_format)) if task else []
