"""A study's evaluations only, this checkout against an earlier revision, in one run, alternating.

    .venv/bin/python benchmarks/eval_speed.py --study DIR --config CONFIG [--against REV] [--rounds 2]
        [--workdir DIR] [--json PATH] [--change TEXT]

DIR is a study of CONFIG whose other steps (world, training, merges, ...) are done: each run starts from a copy of
it with every evaluation's artifact removed, so `knowstack study` runs exactly the evaluations (and writes the
results). Both trees run with the same python, each with its own PYTHONPATH, offline (study_speed.py's runner);
new and old alternate. It prints the wall time of each run, the median ratio new/old with its range, and checks
results.csv and per_example.jsonl byte for byte (exit 1 where they differ)."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_speed  # noqa: E402

ROOT = study_speed.ROOT


def prepared_copy(study: Path, out: Path) -> Path:
    """The study dir without its evaluations (and results): what a run evaluates from."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(study / "artifacts", out / "artifacts", symlinks=True,
                    ignore=lambda _, names: [n for n in names if n.startswith(("eval-", ".partial"))])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True, help="a study dir of --config, its evaluations aside")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--against", default="HEAD~1", help="the revision to compare with (HEAD~1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--change", default="",
                        help="what changed since --against, in words, for the line scripts/docs_numbers.py writes")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="knowstack-eval-speed-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    old_tree = workdir / "old-tree"
    study_speed.remove_worktree(old_tree)
    study_speed.add_worktree(args.against, old_tree)
    runs: dict[str, list[study_speed.StudyRun]] = {"new": [], "old": []}
    try:
        for round_ in range(args.rounds):
            for label, tree in (("new", ROOT), ("old", old_tree)):
                prepared_copy(args.study.resolve(), workdir / f"{label}-{round_}")
                run = study_speed.run_study(label, tree, args.config.resolve(), workdir, round_, fresh=False)
                runs[label].append(run)
                print(f"{study_speed.describe(run)}; {run.steps.get('eval', 0)} evaluations run", flush=True)
    finally:
        study_speed.remove_worktree(old_tree)
    walls = {label: [run.wall for run in found] for label, found in runs.items()}
    ratios = [n / o for n, o in zip(walls["new"], walls["old"], strict=True)]
    ratio = statistics.median(walls["new"]) / statistics.median(walls["old"])
    found = study_speed.differences(runs["new"][-1].out, runs["old"][-1].out)
    print(f"evaluation wall time new/old: {ratio:.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios)}); results: "
          + ("identical" if not found else "DIFFER\n" + "\n".join(found)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "eval_speed", "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "config": str(args.config), "study": str(args.study), "against": args.against, "change": args.change,
            "new": study_speed._revision(ROOT), "rounds": args.rounds, "wall_new": walls["new"],
            "wall_old": walls["old"], "ratio_of_medians": ratio, "round_ratios": ratios,
            "evaluations": runs["new"][-1].steps.get("eval", 0),
            "loads": {label: [list(run.load) for run in found] for label, found in runs.items()},
            "identical": not found, "differences": found}, indent=1) + "\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
