"""The entry point of every launched process: `python -m knowstack.train.jobs job.json` runs the job that
job.json holds, a training run (`TrainJob`, launch.py) or an MoE's router training (`RouterJob`,
router_job.py), as its job_kind says. It sits above both kinds, which import only launch.py's machinery."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from knowstack.errors import KnowstackError
from knowstack.train.launch import ROUTER_JOB_KIND, TrainJob, run_job


def run_job_file(path: Path) -> None:
    """Run the job in job.json: a training run (TrainJob), or MoE router training (its job_kind says so)."""
    header = json.loads(Path(path).read_text(encoding="utf-8"))
    if header.get("job_kind") == ROUTER_JOB_KIND:
        from knowstack.train.router_job import RouterJob, run_router_job

        run_router_job(RouterJob.load(path))
    else:
        run_job(TrainJob.load(path))


def main(argv: list[str] | None = None) -> int:
    """Entry point of every launched process: `python -m knowstack.train.jobs job.json`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m knowstack.train.jobs JOB.json", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_job_file(Path(args[0]))
    except KnowstackError as err:  # the user's mistake: one line, not a traceback per process
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
