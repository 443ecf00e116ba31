"""A study's wall time, this checkout against an earlier revision, in one run: where the time went, per kind of step.

    .venv/bin/python benchmarks/study_speed.py [--against dd9148c] [--config configs/builtin-quick.yaml]
        [--preset test] [--rounds 1] [--study-args "--jobs 2"] [--workdir DIR] [--keep] [--json PATH]
    .venv/bin/python benchmarks/study_speed.py --table --workdir DIR    # the table of a cut-off run's finished pairs

REV (default: the commit before the speed work, issue 22) is checked out in a temporary `git worktree`. Both trees
run the same config (--preset rewrites its `base.builtin`, e.g. `test` for a check in a few minutes) with the same
python (this one), each with its own PYTHONPATH (its tree's src), study dir and caches (KNOWSTACK_CACHE,
HF_HOME), offline. The runs alternate (new, old, new, old, ...: load that drifts hits both alike) and each starts
from an empty study dir, so every step runs.

Per kind of step (world, train, merge-adapter, eval, merge, moe) it prints the seconds the study's own step
records give (artifacts/<step>/step.json "cost", knowstack.usage), summed over the kind's steps, and the ratio
new/old; and the wall time of the whole `knowstack study` process, whose ratio is the one that counts: steps
that run side by side share the cores, so their summed seconds can exceed the wall time. With several rounds,
the median of each and the range of the ratios.

Then it checks that both studies found the same numbers: the built-in world's fingerprint (its weights, tokenizer,
corpus and tasks) and results.csv and per_example.jsonl byte for byte. No tolerance is applied: any difference is
printed and the exit status is 1. One allowance: a results.csv column this checkout adds (a setting made sweepable
since REV) must be empty in every row, and the rows are compared on REV's columns.

The machine's load (os.getloadavg) is printed with every run: on a shared machine, a ratio is only meaningful
between runs made under like load, which is why the two alternate. --json writes the table, the runs (wall, load)
and the identity check as JSON, for scripts/docs_numbers.py (`--speed`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_AGAINST = "dd9148c"  # the commit before issue 22's first change
DEFAULT_CONFIG = ROOT / "configs" / "builtin-quick.yaml"
KIND_ORDER = ("world", "train", "merge-adapter", "eval", "merge", "moe")
COMPARED_FILES = ("results.csv", "per_example.jsonl")
WALL = "wall (whole study)"


@dataclass
class StudyRun:
    """One `knowstack study` process: its wall seconds, the seconds its steps recorded (per kind) and the load."""

    label: str
    wall: float
    by_kind: dict[str, float]
    steps: dict[str, int]
    load: tuple[float, float, float]
    out: Path = field(default=Path())


# --- the studies' own records ------------------------------------------------------------------------
def step_records(study: Path) -> list[dict]:
    """Every finished step's step.json (key, kind, cost) in the study dir."""
    return [json.loads(path.read_text()) for path in sorted((study / "artifacts").glob("*/step.json"))]


def seconds_by_kind(records: list[dict]) -> tuple[dict[str, float], dict[str, int]]:
    """Summed cost.seconds and the number of steps, per kind of step."""
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for record in records:
        kind = record["kind"]
        seconds[kind] = seconds.get(kind, 0.0) + float(record["cost"]["seconds"])
        counts[kind] = counts.get(kind, 0) + 1
    return seconds, counts


def ordered_kinds(kinds: set[str]) -> list[str]:
    return [k for k in KIND_ORDER if k in kinds] + sorted(kinds - set(KIND_ORDER))


def ratio_table(new: list[StudyRun], old: list[StudyRun]) -> list[tuple[str, int, float, float, float, str]]:
    """Rows (kind, steps, median new s, median old s, ratio of the medians, range of the per-round ratios): one per
    kind of step, then the steps' total and the whole study's wall time."""
    kinds = ordered_kinds({k for run in new + old for k in run.by_kind})
    rows = []
    for kind in [*kinds, "all steps", WALL]:
        new_s = [_seconds(run, kind) for run in new]
        old_s = [_seconds(run, kind) for run in old]
        steps = max((run.steps.get(kind, 0) for run in new + old), default=0) if kind in kinds else \
            max((sum(run.steps.values()) for run in new + old), default=0)
        ratios = [n / o for n, o in zip(new_s, old_s, strict=False) if o > 0]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else ""
        new_median, old_median = statistics.median(new_s), statistics.median(old_s)
        ratio = new_median / old_median if old_median > 0 else float("nan")
        rows.append((kind, steps, new_median, old_median, ratio, spread))
    return rows


def _seconds(run: StudyRun, kind: str) -> float:
    if kind == WALL:
        return run.wall
    if kind == "all steps":
        return sum(run.by_kind.values())
    return run.by_kind.get(kind, 0.0)


def format_table(rows: list[tuple[str, int, float, float, float, str]], new_label: str, old_label: str) -> str:
    head = f"{'kind':<20} {'steps':>5} {new_label + ' s':>12} {old_label + ' s':>12} {'new/old':>8} {'range':>10}"
    lines = [head, "-" * len(head)]
    for kind, steps, new_s, old_s, ratio, spread in rows:
        lines.append(f"{kind:<20} {steps:>5} {new_s:>12.1f} {old_s:>12.1f} {ratio:>8.2f} {spread:>10}")
    return "\n".join(lines)


def differences(new: Path, old: Path) -> list[str]:
    """What differs between two study dirs' numbers: the world's fingerprint, then each compared file (the first
    differing lines of each); empty when they are identical."""
    found = []
    prints = [_fingerprint(study) for study in (new, old)]
    if prints[0] != prints[1]:
        found.append(f"world fingerprint: {prints[0]} vs {prints[1]}")
    for name in COMPARED_FILES:
        a, b = new / name, old / name
        if not a.is_file() or not b.is_file():
            found.append(f"{name}: missing in {'new' if not a.is_file() else 'old'} study")
            continue
        lines_a, lines_b = a.read_text().splitlines(), b.read_text().splitlines()
        if lines_a == lines_b:
            continue
        if name.endswith(".csv") and lines_a and lines_b and lines_a[0] != lines_b[0]:
            found += csv_differences(name, lines_a, lines_b)
            continue
        if len(lines_a) != len(lines_b):
            found.append(f"{name}: {len(lines_a)} lines vs {len(lines_b)}")
        shown = [(i, x, y) for i, (x, y) in enumerate(zip(lines_a, lines_b, strict=False)) if x != y][:5]
        found += [f"{name} line {i + 1}:\n  new {x[:300]}\n  old {y[:300]}" for i, x, y in shown]
    return found


def csv_differences(name: str, new: list[str], old: list[str]) -> list[str]:
    """Two CSVs whose headers differ: a column the new checkout adds (a results column for a setting added since,
    e.g. a new sweepable setting) is allowed where it is empty in every row, and the rows are then compared on the
    old revision's columns; a column it lost, or a value in an added one, is a difference."""
    rows_new, rows_old = list(csv.DictReader(new)), list(csv.DictReader(old))
    columns_new, columns_old = list(rows_new[0]) if rows_new else [], list(rows_old[0]) if rows_old else []
    lost = [c for c in columns_old if c not in columns_new]
    if lost:
        return [f"{name}: columns {', '.join(lost)} missing in the new study"]
    added = [c for c in columns_new if c not in columns_old]
    filled = [(i, c) for i, row in enumerate(rows_new) for c in added if row[c]]
    found = [f"{name} line {i + 2}: added column {c} = {rows_new[i][c]!r}" for i, c in filled[:5]]
    if len(rows_new) != len(rows_old):
        found.append(f"{name}: {len(rows_new)} rows vs {len(rows_old)}")
    for i, (x, y) in enumerate(zip(rows_new, rows_old, strict=False)):
        if [x[c] for c in columns_old] != [y[c] for c in columns_old]:
            found.append(f"{name} line {i + 2} (on the old columns):\n  new {x}\n  old {y}")
            if len(found) >= 5:
                break
    return found


def _fingerprint(study: Path) -> str | None:
    worlds = sorted((study / "artifacts").glob("*/world.json"))
    return json.loads(worlds[0].read_text())["fingerprint"] if worlds else None


# --- running the two trees -----------------------------------------------------------------------------
def add_worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   stdout=subprocess.DEVNULL)
    return where


def remove_worktree(where: Path) -> None:
    if where.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)


def study_config(config: Path, preset: str | None, workdir: Path) -> Path:
    """The config both trees run: the given one, with base.builtin set to `preset` if given."""
    if preset is None:
        return config.resolve()
    data = yaml.safe_load(config.read_text())
    data["base"]["builtin"] = preset
    data["name"] = f"{data.get('name', 'study')}-{preset}"
    path = workdir / f"config-{preset}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_study(label: str, tree: Path, config: Path, workdir: Path, round_: int,
              extra: Sequence[str] = (), fresh: bool = True) -> StudyRun:
    """fresh: from an empty study dir (else from what is in it: eval_speed.py's prepared steps)."""
    out = workdir / f"{label}-{round_}"
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    caches = workdir / f"cache-{label}"
    steps = workdir / f"steps-{label}-{round_}"  # a shared step cache of the run's own: each run computes every step
    shutil.rmtree(steps, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "KNOWSTACK_CACHE": str(steps),
           "HF_HOME": str(caches / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    log = workdir / f"{label}-{round_}.log"
    load = os.getloadavg()
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, "-m", "knowstack.cli", "study", str(config), "--out", str(out), *extra],
                              cwd=tree, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{label} study failed (exit {done.returncode}): see {log}")
    by_kind, steps = seconds_by_kind(step_records(out))
    return StudyRun(label, wall, by_kind, steps, load, out)


RUNS_FILE = "runs.jsonl"  # in the workdir: each finished run, so that --table can print a cut-off benchmark's table


def record_run(workdir: Path, run: StudyRun) -> None:
    with (workdir / RUNS_FILE).open("a") as handle:
        handle.write(json.dumps({"label": run.label, "wall": run.wall, "load": run.load, "out": str(run.out)}) + "\n")


def recorded_runs(workdir: Path) -> tuple[list[StudyRun], list[StudyRun]]:
    """The new and the old runs recorded in a workdir, paired in order (an unpaired last run is left out)."""
    runs: dict[str, list[StudyRun]] = {"new": [], "old": []}
    for line in (workdir / RUNS_FILE).read_text().splitlines():
        entry = json.loads(line)
        by_kind, steps = seconds_by_kind(step_records(Path(entry["out"])))
        runs[entry["label"]].append(StudyRun(entry["label"], entry["wall"], by_kind, steps, tuple(entry["load"]),
                                             Path(entry["out"])))
    pairs = min(len(runs["new"]), len(runs["old"]))
    return runs["new"][:pairs], runs["old"][:pairs]


def print_comparison(new_runs: list[StudyRun], old_runs: list[StudyRun], json_path: Path | None = None,
                     setup: dict | None = None) -> int:
    """The table and the identity check (and, given a path, both as JSON); the exit status (1 where the results
    differ)."""
    print(f"\nmedian of {len(new_runs)} round(s); steps' seconds from their step.json, summed per kind "
          "(steps run side by side share the cores: the wall time is the ratio that counts)")
    rows = ratio_table(new_runs, old_runs)
    print(format_table(rows, "new", "old"))
    found = differences(new_runs[-1].out, old_runs[-1].out)
    print("\nresults: " + ("identical (world fingerprint, " + ", ".join(COMPARED_FILES) + ")" if not found
                           else "DIFFER\n" + "\n".join(found)))
    if json_path is not None:
        write_json(json_path, rows, new_runs, old_runs, found, setup or {})
    return 1 if found else 0


def write_json(path: Path, rows: list[tuple[str, int, float, float, float, str]], new_runs: list[StudyRun],
               old_runs: list[StudyRun], found: list[str], setup: dict) -> None:
    """The benchmark's outcome as JSON: per kind (steps, median seconds new/old, ratio, per-round ratios), each run's
    wall time and load, whether the results were identical, and what was compared (setup)."""
    per_round = {kind: [_seconds(n, kind) / _seconds(o, kind) if _seconds(o, kind) > 0 else None
                        for n, o in zip(new_runs, old_runs, strict=True)] for kind, *_ in rows}
    record = {
        "benchmark": "study_speed",
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        **setup,
        "rounds": len(new_runs),
        "kinds": [{"kind": kind, "steps": steps, "new_seconds": new_s, "old_seconds": old_s, "ratio": ratio,
                   "round_ratios": per_round[kind]} for kind, steps, new_s, old_s, ratio, _ in rows],
        "runs": [{"label": run.label, "wall": run.wall, "load": list(run.load)} for pair in
                 zip(new_runs, old_runs, strict=True) for run in pair],
        "identical": not found,
        "differences": found,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def _revision(tree: Path) -> str:
    """The checkout's commit, with "+changes" when its tracked files differ from it."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "diff", "--quiet", "HEAD"], check=False).returncode != 0
    return head.stdout.strip() + ("+changes" if dirty else "")


def describe(run: StudyRun) -> str:
    load = " ".join(f"{x:.2f}" for x in run.load)
    return f"{run.label}: {run.wall:.1f} s wall, {sum(run.steps.values())} steps (load average at start {load})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default=DEFAULT_AGAINST, help=f"the revision to compare with ({DEFAULT_AGAINST})")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the study config both trees run")
    parser.add_argument("--preset", help="run the config with this built-in world preset (e.g. test) instead")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs, alternating new and old")
    parser.add_argument("--workdir", type=Path, help="where the studies and the old tree go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the studies (and the workdir)")
    parser.add_argument("--study-args", default="", help="extra arguments for this checkout's `knowstack study` "
                        "(e.g. \"--jobs 2\"); REV runs without them")
    parser.add_argument("--json", type=Path, help="also write the outcome as JSON here")
    parser.add_argument("--table", action="store_true",
                        help="run nothing: print the table of the runs recorded in --workdir (e.g. cut off)")
    args = parser.parse_args(argv)
    if args.table:
        if args.workdir is None:
            parser.error("--table needs --workdir")
        new_runs, old_runs = recorded_runs(args.workdir.resolve())
        if not new_runs:
            parser.error(f"no pair of finished runs recorded in {args.workdir}")
        for run in [r for pair in zip(new_runs, old_runs, strict=True) for r in pair]:
            print(describe(run))
        return print_comparison(new_runs, old_runs, args.json)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="knowstack-study-speed-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RUNS_FILE).unlink(missing_ok=True)
    old_tree = workdir / "old-tree"
    remove_worktree(old_tree)
    add_worktree(args.against, old_tree)
    try:
        config = study_config(args.config, args.preset, workdir)
        print(f"config {config}; new: {ROOT} (this checkout), old: {args.against}; python {sys.executable}",
              flush=True)
        new_runs, old_runs = [], []
        for round_ in range(args.rounds):
            for label, tree, runs in (("new", ROOT, new_runs), ("old", old_tree, old_runs)):
                extra = shlex.split(args.study_args) if label == "new" else []
                runs.append(run_study(label, tree, config, workdir, round_, extra))
                record_run(workdir, runs[-1])
                print(describe(runs[-1]), flush=True)
        setup = {"config": str(args.config), "preset": args.preset, "against": args.against,
                 "new": _revision(ROOT), "study_args": args.study_args}
        return print_comparison(new_runs, old_runs, args.json, setup)
    finally:
        remove_worktree(old_tree)
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
