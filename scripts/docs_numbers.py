"""Writes every figure the README and docs quote from the runs that measured it, so that none can drift.

A figure lives in a marked block of a markdown file, README.md or any page docs/*.md:

    <!-- numbers:demo-base -->
    ...generated text...
    <!-- /numbers -->

and each block's name says what generates it from which results dir (BLOCKS below). Run

    python scripts/docs_numbers.py --demo runs/demo --registry runs/registry-scenario/registry \
        [--quick-all runs/quick-all] [--spread runs/world-1-thread runs/world-2-threads] \
        [--memory tests/fixtures/configs/llama-3-8b] [--vocabulary] [--claims] [--kernel-paths runs/kernel-paths.json ...]

(`make docs-numbers`) to rewrite the blocks whose results dir is given (--memory: a dir holding a
config.json, which needs no run; --vocabulary: docs/commands.md's table of options, read from the command-line
parsers; --claims: docs/claims.md's table, read from report/claims.py); the other blocks are left as they are and listed. A results dir that is missing or lacks what its blocks read is one clear error
(exit 2) and nothing is written; `--check` rewrites nothing and exits 1 when a block would change.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

import knowstack
from knowstack.atomic import atomic_write_text
from knowstack.config import load_config
from knowstack.errors import KnowstackError
from knowstack.report.runs import backward_transfer, find_runs, mean_defined, run_averages
from knowstack.report.tables import Scores, fmt_percent
from knowstack.results import Row, read_csv
from knowstack.study.plan import build_plan
from knowstack.study.results import current_rows

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- numbers:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /numbers -->)", re.S)
OLD_TASK_NAMES = {"ks_country_code": "country codes", "ks_language_code": "language codes",
                  "ks_subdivision": "subdivisions", "ks_unicode_name": "Unicode names"}
TASK_ORDER = ["stance", "notes", "summary", "code", "quiz", "simplify", "math"]


def doc_files(root: Path) -> list[str]:
    """README.md and every docs/*.md page, relative to the checkout: a block is found wherever it was moved."""
    return ["README.md", *sorted(page.relative_to(root).as_posix() for page in (root / "docs").glob("*.md"))]


def study_results(path: Path, option: str) -> list[Row]:
    """A study dir's rows as `knowstack report` reads them: results.csv, or the evaluations finished so far."""
    if (path / "config.yaml").is_file():
        rows = current_rows(build_plan(load_config(path / "config.yaml"), path), path)
    elif (path / "results.csv").is_file():
        rows = read_csv(path / "results.csv")
    else:
        raise KnowstackError("not a study's results dir (no config.yaml or results.csv): run the study it names "
                             "first (`make demo` for runs/demo)", path=path, field=option)
    if not rows:
        raise KnowstackError("no results yet: no evaluation of this study has finished", path=path, field=option)
    return rows


@dataclass(frozen=True)
class Study:
    """A study's results dir: its rows, its built-in world's manifest, and when its steps ran."""

    path: Path
    rows: list[Row]
    world: dict
    steps: int
    seconds: float
    finished: float  # when its last artifact was written (a POSIX time)

    @classmethod
    def read(cls, path: Path, option: str) -> Study:
        rows = study_results(path, option)
        worlds = sorted((path / "artifacts").glob("world-*/world.json"))
        if len(worlds) != 1:
            raise KnowstackError(f"expected the one built-in world the docs describe, found {len(worlds)} under "
                                 "artifacts/", path=path, field=option)
        world = json.loads(worlds[0].read_text())
        artifacts = [p for p in (path / "artifacts").iterdir() if p.is_dir() and not p.name.startswith(".")]
        # From the world's start (its manifest's mtime less its build time) to the last artifact written.
        start = worlds[0].stat().st_mtime - world.get("build_seconds", 0)
        end = max(p.stat().st_mtime for p in artifacts)
        return cls(path, rows, world, len(artifacts), end - start, end)

    @property
    def scores(self) -> Scores:
        return Scores.from_rows(self.rows, TASK_ORDER)

    def provenance(self) -> str:
        env = self.world.get("environment", {})
        day = dt.datetime.fromtimestamp(self.finished, dt.timezone.utc).date()
        return (f"measured on {day} in `{self.path.name}` (built-in world `{self.world['preset']}`, fingerprint "
                f"`{self.world.get('fingerprint', '?')}`, Python {env.get('python', '?')}, torch {env.get('torch', '?')}, "
                f"torch threads: {env.get('torch_threads', '?')}{kernel_words(env)})")


def kernel_words(env: dict) -> str:
    """The machine and kernel path world.json records (knowstack/kernels.py), where it does: ', CPU ... (...)'."""
    if "cpu" not in env:
        return ""
    return (f", CPU {env['cpu']}: torch's {env.get('torch_cpu_capability', '?')} kernels, "
            f"oneDNN {env.get('onednn_max_cpu_isa', '?')}, MKL_CBWR {env.get('mkl_cbwr', '?')}")


def number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def with_interval(row: Row) -> str:
    """A score and, where the results carry one, its 95% interval."""
    low, high = getattr(row, "ci_low", None), getattr(row, "ci_high", None)
    return number(row.value) + (f" [{number(low)}, {number(high)}]" if low is not None and high is not None else "")


def rows_of(study: Study, model: str, kind: str, metric: str | None = None) -> list[Row]:
    return [r for r in study.rows if r.model == model and r.kind == kind and (metric is None or r.metric == metric)]


def demo_base(study: Study) -> str:
    old = {r.task: r for r in rows_of(study, "base", "old", "acc")}
    if not old:
        raise KnowstackError("no old-knowledge rows of the base (model 'base', metric 'acc')",
                             path=study.path / "results.csv")
    listed = ", ".join(f"{with_interval(old[t])} ({OLD_TASK_NAMES.get(t, t)})" for t in sorted(old))
    new = ", ".join(f"{r.task} {with_interval(r)} ({r.metric})" for r in rows_of(study, "base", "new"))
    ave = study.scores.averages("base")["AVE"]
    return (f"Base old knowledge, {study.provenance()}: {listed} on its {len(old)} lm-eval tasks (chance 0.25), "
            f"AVE {number(ave)}" + (f"; on the new tasks before any training: {new}." if new else "."))


def demo_time(study: Study) -> str:
    return (f"Last measured: {study.seconds / 60:.1f} minutes for its {study.steps} steps, install not included "
            f"({study.provenance().removeprefix('measured ')}).")


def demo_study(study: Study) -> str:
    """What each method's runs keep and learn: AVE and AVnew per run, one-round FFT per task, mean BWT."""
    scores = study.scores
    lines = [f"The study's runs, {study.provenance()}; {study.steps} steps in {study.seconds / 60:.1f} minutes "
             "(from the world's start to the last step's end):", ""]
    base = scores.averages("base")
    lines.append(f"- base: AVE {number(base['AVE'])}, AVnew {number(base['AVnew'])}")
    for run in find_runs(scores):
        if run.method == "base" or run.point:
            continue
        averages = run_averages(scores, run)
        text = f"- {run.label}: AVE {number(averages['AVE'])}, AVnew {number(averages['AVnew'])}"
        if run.staged:
            bwt = mean_defined(list(backward_transfer(scores, run).values()))
            text += f" after {len(run.models)} rounds, mean BWT {fmt_percent(bwt)}"
        lines.append(text)
    one_round = [r for r in study.rows if r.method == "one-round" and r.finetune == "fft" and r.kind == "new"
                 and r.task == r.trained_on]
    base_new = {(r.task, r.metric): r.value for r in rows_of(study, "base", "new")}
    if one_round:
        learned = ", ".join(f"{r.task} {number(base_new.get((r.task, r.metric)))} -> {number(r.value)} ({r.metric})"
                            for r in one_round)
        lines += ["", f"One round of FFT on each task, from the base: {learned}."]
    return "\n".join(lines)


def registry_scenario(path: Path) -> str:
    from knowstack.registry.core import Registry
    from knowstack.registry.history import format_log

    if not (path / "registry.sqlite").is_file():
        raise KnowstackError("not a registry (no registry.sqlite): run `make registry-demo` first",
                             path=path, field="--registry")
    with Registry.open(path) as reg:
        log = format_log(reg)
    return f"`knowstack log` of the scenario's registry (`{path}`):\n\n```\n{log}\n```"


def world_spread(studies: list[Study]) -> str:
    """The same world built under other thread counts (or machines): its hashes and the base's old knowledge."""
    tasks = sorted({r.task for study in studies for r in rows_of(study, "base", "old", "acc")})
    header = ["threads", "Python", "fingerprint", "weights", *(OLD_TASK_NAMES.get(t, t) for t in tasks), "AVE"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for study in studies:
        env, old = study.world.get("environment", {}), {r.task: r for r in rows_of(study, "base", "old", "acc")}
        cells = [str(env.get("torch_threads", "?")), str(env.get("python", "?")), f"`{study.world.get('fingerprint')}`",
                 f"`{study.world.get('hashes', {}).get('weights', '?')[:12]}`",
                 *(with_interval(old[t]) if t in old else "n/a" for t in tasks),
                 number(study.scores.averages("base")["AVE"])]
        lines.append("| " + " | ".join(cells) + " |")
    same = len({study.world.get("hashes", {}).get("corpus") for study in studies}) == 1
    return (f"The built-in world `{studies[0].world['preset']}` built {len(studies)} times "
            f"({', '.join(f'`{s.path.name}`' for s in studies)}; corpus {'identical' if same else 'different'}):\n\n"
            + "\n".join(lines))


def verdict_spread(studies: list[Study]) -> str:
    """The paper's findings as one config's study judged them under other kernel paths (or machines): each claim's
    verdict per study dir (tables/claims.csv, as its report wrote it), and which claims change verdict."""
    verdicts = [claim_verdicts(study) for study in studies]
    claims = list(dict.fromkeys(name for found in verdicts for name in found))
    header = ["claim", *(f"`{s.path.name}`" for s in studies)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    changed = []
    for name in claims:
        cells = [found.get(name, ("", "n/a"))[1] for found in verdicts]
        if len(set(cells)) > 1:
            changed.append(f"{name} ({' / '.join(cells)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    dirs = "\n".join(f"- `{s.path.name}`: world `{s.world.get('fingerprint', '?')}`"
                     f"{kernel_words(s.world.get('environment', {}))}" for s in studies)
    summary = (f"{len(claims) - len(changed)} of {len(claims)} findings have the same verdict in every dir"
               + (f"; the verdict changes for {', '.join(changed)}." if changed else "."))
    return f"{dirs}\n\n" + "\n".join(lines) + f"\n\n{summary}"


def claim_verdicts(study: Study) -> dict[str, tuple[str, str]]:
    """{claim id: (the paper's finding, verdict)} of a study's report (tables/claims.csv)."""
    path = study.path / "tables" / "claims.csv"
    if not path.is_file():
        raise KnowstackError("no tables/claims.csv: the study has no report yet (`knowstack report`)", path=study.path,
                             field="--verdicts")
    with path.open(encoding="utf-8", newline="") as handle:
        return {row["#"]: (row["the paper's finding"], row["verdict"]) for row in csv.DictReader(handle)}


def kernel_spread(paths: list[Path]) -> str:
    """A table per file of scripts/kernel_paths.py's JSON: one world built under every kernel path x thread count
    on one machine, its fingerprints, which are the same, and what MKL's strict mode costs in pretraining speed."""
    return "\n\n".join(kernel_table(path) for path in paths)


def kernel_table(path: Path) -> str:
    record = json.loads(path.read_text(encoding="utf-8"))
    machine, builds = record["machine"], record["builds"]
    threads = sorted({b["threads"] for b in builds})
    lines = ["| MKL_CBWR | ATen / oneDNN | torch's CPU capability | "
             + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in threads) + " |", "|" + "---|" * (3 + len(threads))]
    paths: dict[tuple[str, str], dict[int, dict]] = {}
    for build in builds:
        paths.setdefault((build["mkl"], build["torch"]), {})[build["threads"]] = build
    for (mkl, torch_path), by_threads in paths.items():
        capability = next(iter(by_threads.values()))["environment"].get("torch_cpu_capability", "?")
        cells = [f"`{by_threads[t]['fingerprint']}`" if t in by_threads else "n/a" for t in threads]
        lines.append(f"| {mkl} | {torch_path} | {capability} | " + " | ".join(cells) + " |")
    per_path = {key: {b["fingerprint"] for b in by.values()} for key, by in paths.items()}
    varying = [f"{mkl} / {torch_path}" for (mkl, torch_path), prints in per_path.items() if len(prints) > 1]
    distinct = len({b["fingerprint"] for b in builds})
    summary = (f"{distinct} distinct fingerprint(s) in {len(builds)} builds; "
               + ("every kernel path gives one world on every thread count built" if not varying else
                  f"the thread count changes the world on: {', '.join(varying)}"))
    by_mkl: dict[str, set[str]] = {}
    for build in builds:
        by_mkl.setdefault(build["mkl"], set()).add(build["fingerprint"])
    varied = {mkl for mkl, _ in paths if len({torch_path for m, torch_path in paths if m == mkl}) > 1}
    same = [mkl for mkl, prints in by_mkl.items() if mkl in varied and len(prints) == 1]
    if varied:  # only where more than one ATen / oneDNN path was built
        summary += ("; one world whatever ATen's and oneDNN's ISA with MKL_CBWR " + ", ".join(same) if same else
                    "; ATen's ISA changes the world under every MKL_CBWR")
    summary += "."
    speed_lines = []
    for count in sorted({r["threads"] for r in record.get("speed", [])}):
        times = {mkl: sorted(r["seconds_per_step"] for r in record["speed"] if r["threads"] == count and r["mkl"] == mkl)
                 for mkl in ("MKL default", "AVX2,STRICT")}
        if all(times.values()):
            (default, low, high), (strict, low_strict, high_strict) = (
                (values[len(values) // 2] * 1000, values[0] * 1000, values[-1] * 1000) for values in times.values())
            speed_lines.append(f"{count} thread{'s' * (count > 1)}: {default:.0f} ms [{low:.0f}-{high:.0f}] with MKL's "
                               f"default, {strict:.0f} ms [{low_strict:.0f}-{high_strict:.0f}] with AVX2,STRICT "
                               f"({strict / default:.2f}x)")
    rounds = max((sum(1 for r in record["speed"] if r["threads"] == t and r["mkl"] == "MKL default")
                  for t in {r["threads"] for r in record.get("speed", [])}), default=0)
    speed = (f"\n\nA pretraining step of the quick world's model (median [range] of {rounds} alternating rounds): "
             + "; ".join(speed_lines) + "." if speed_lines else "")
    return (f"The built-in world `{machine['preset']}` built on one machine ({machine['cpu']}, {machine['cores']} cores, "
            f"Python {machine['python']}, torch {machine['torch']}) on {machine.get('date', '?')}, each build in a fresh "
            f"process with the variables named (`python scripts/kernel_paths.py`):\n\n" + "\n".join(lines)
            + f"\n\n{summary}{speed}")


# The paper's ways of combining one-round models, against which the catalog's others are read: a merge (or a
# continual merge: also one model of the base's size) against the paper's merges, a mixture against its MoE.
PAPER_COMBINERS = {"merge": ("average", "ties", "ties-dare"), "moe": ("", "prompts")}
COMPARED_WITH = {"merge": "merge", "continual-merge": "merge", "moe": "moe"}


def catalog(study: Study) -> str:
    """configs/builtin-catalog.yaml's combinations of the one-round models on the learn/forget plane: each run's
    AVE (old), AVnew and AVall with 95% intervals, and its AVall against the best of the paper's combinations of the
    same kind (merges against the paper's merges, mixtures against its MoE) and finetune, as a paired difference:
    better / worse where the interval excludes 0, else inconclusive."""
    from knowstack.stats import interval_of
    from knowstack.study.results import current_items

    plan = build_plan(load_config(study.path / "config.yaml"), study.path)
    scores = Scores.from_rows(study.rows, TASK_ORDER, items=current_items(plan, study.path))
    runs = [r for r in find_runs(scores) if r.method in COMPARED_WITH]
    averages = {run.key: run_averages(scores, run) for run in runs}  # a continual merge: after its last round

    def paper(run: object) -> bool:
        return not run.point and run.variant in PAPER_COMBINERS.get(run.method, ())

    best: dict[tuple[str, str], object] = {}
    for run in runs:
        group = (COMPARED_WITH[run.method], run.finetune)
        value = averages[run.key]["AVall"]
        if paper(run) and value is not None and (group not in best or value > averages[best[group].key]["AVall"]):
            best[group] = run

    def cell(value: object) -> str:
        ci = interval_of(value)
        return number(value) + (f" [{number(ci[0])}, {number(ci[1])}]" if ci else "")

    lines = ["| run | AVE (old) | AVnew | AVall | AVall − the paper's best of its kind |", "|---|---|---|---|---|"]
    tally = {"better": 0, "worse": 0, "inconclusive": 0}
    for run in runs:
        a = averages[run.key]
        reference = best.get((COMPARED_WITH[run.method], run.finetune))
        if paper(run) or reference is None or a["AVall"] is None:
            versus = "(the paper's: best)" if reference is run else "(the paper's)" if paper(run) else "n/a"
        else:
            difference = a["AVall"] - averages[reference.key]["AVall"]
            ci = interval_of(difference)
            verdict = ("inconclusive" if ci is None or ci[0] <= 0 <= ci[1] else "better" if ci[0] > 0 else "worse")
            tally[verdict] += 1
            interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
            versus = f"{difference:+.3f}{interval} vs {reference.label}: {verdict}"
        lines.append(f"| {run.label} | {cell(a['AVE'])} | {cell(a['AVnew'])} | {cell(a['AVall'])} | {versus} |")
    summary = ", ".join(f"{count} {word}" for word, count in tally.items())
    return (f"Every combination of the one-round models, {study.provenance()}. On AVall, against the paper's best of "
            "the same kind and finetune (merges and continual merges against the paper's merges, mixtures against "
            f"its MoE; paired bootstrap over test items): {summary}.\n\n" + "\n".join(lines))


def study_speed_line(record: dict) -> str:
    """The study benchmark: this checkout's wall time over REV's, per kind, and whether the numbers stayed the same."""
    kinds = {row["kind"]: row for row in record["kinds"]}
    wall = kinds["wall (whole study)"]
    spread = [r for r in wall["round_ratios"] if r is not None]
    span = f", range {min(spread):.2f}-{max(spread):.2f}" if len(spread) > 1 else ""
    parts = ", ".join(f"{kind} {kinds[kind]['ratio']:.2f}x" for kind in ("world", "train", "eval") if kind in kinds)
    args = f" with `{record['study_args']}`" if record.get("study_args") else ""
    same = "identical numbers" if record["identical"] else f"numbers that DIFFER ({len(record['differences'])} differences)"
    loads = ", ".join(f"{run['load'][0]:.1f}" for run in record["runs"])
    # a table printed from a cut-off run's records (--table) does not know its config or revision
    config = f"`{Path(record['config']).name}`" if record.get("config") else "config not recorded"
    against = f"`{record['against']}`" if record.get("against") else "the earlier revision"
    return (f"- the demo's study ({config}){args}: {wall['ratio']:.2f}x the wall time of "
            f"{against} (median of {record['rounds']} alternating round(s){span}; {parts}), "
            f"{same}; `benchmarks/study_speed.py`, {record['measured']}, {record['cores']} cores, load average at "
            f"each start {loads}")


def eval_speed_line(record: dict) -> str:
    """A study's evaluations only, this checkout against an earlier revision (the change, in words, from --change)."""
    rounds = ", ".join(f"{r:.2f}" for r in record["round_ratios"])
    loads = ", ".join(f"{load[0]:.1f}" for pair in zip(record["loads"]["new"], record["loads"]["old"], strict=True)
                      for load in pair)
    same = "identical results" if record["identical"] else f"results that DIFFER ({len(record['differences'])} files)"
    change = record.get("change") or "adapters of one base run on the base loaded once"  # the first run's change
    return (f"- that study's {record['evaluations']} evaluations only (`{record['config']}`; {change}): "
            f"{record['ratio_of_medians']:.2f}x the wall time of `{record['against']}` "
            f"(median of {record['rounds']} alternating round(s), rounds {rounds}), {same}; "
            f"`benchmarks/eval_speed.py`, {record['measured']}, load average at each start {loads}")


def compute_floor_line(record: dict) -> str:
    """The floor: the share of the study's time in fp32 matmul and attention kernels that no same-numbers change can
    remove."""
    kinds = ", ".join(f"{kind} {values['kernel_share']:.0%}" for kind, values in record["kinds"].items())
    return (f"- of that study's time, {record['floor_ratio']:.2f} is spent in float32 matmul and attention kernels ({kinds}; "
            f"matmuls at up to {max(v['matmul_gflops'] for v in record['kinds'].values()) / record['sgemm_gflops']:.0%} "
            f"of this machine's sgemm, {record['sgemm_gflops']:.0f} GFLOP/s on {record['threads']} threads): no change "
            f"that keeps every number can take the study below {record['floor_ratio']:.2f}x of its time; "
            f"`benchmarks/compute_floor.py`, {record['measured']}")


def merge_line(record: dict) -> str:
    """knowstack's streamed merges against mergekit: wall and CPU ratios, peak memory, and how far the outputs differ."""
    parts = []
    for m in record["methods"]:
        ratio, cpu = m["ratio"], m["cpu_ratio"]
        parts.append(f"{m['method']} (mergekit `{m['mergekit_method']}`) {ratio['median']:.2f}x mergekit's wall time "
                     f"[{ratio['min']:.2f}-{ratio['max']:.2f}] and {cpu['median']:.2f}x its CPU time, peak memory "
                     f"{m['knowstack']['peak_rss_per_checkpoint']:.2f} checkpoints vs "
                     f"{m['mergekit']['peak_rss_per_checkpoint']:.2f}, largest output difference "
                     f"{m['max_abs_diff']:.2g} ({m['entries_differing']} of {m['entries']} entries differ)")
    settings, load = record["settings"], record["load_average_before"][0]
    hashes = "" if settings.get("knowstack_input_hashes", True) else " (knowstack with --no-input-hashes)"
    return (f"- merging {settings['models']} checkpoints of {settings['parameters'] / 1e6:.0f}M parameters{hashes}: "
            + "; ".join(parts) + f" (median of {settings['repeats']} alternating runs, inputs in the page cache; "
            f"`{speed_command('merge.json' if hashes == '' else 'merge-no-input-hashes.json')}`, "
            f"{record['date'][:16].replace('T', ' ')} UTC, load average {load:.1f})")


def train_line(record: dict) -> str:
    """knowstack's training loop against HF Trainer's stronger collator, tokens per second."""
    parts = []
    for r in record["results"]:
        ratio, peer = r["ratio_vs_stronger_peer"], r["stronger_peer"]
        parts.append(f"{ {'fft': 'FFT', 'lora': 'LoRA'}.get(r['finetune'], r['finetune'])} {ratio['median']:.2f}x the tokens per second of Trainer with its "
                     f"{'DataCollatorWithFlattening' if peer == 'flattening' else 'padded batches'} "
                     f"[{ratio['min']:.2f}-{ratio['max']:.2f}]")
    load = record["load_average"]["before"][0]
    return (f"- training ({record['model']['params'] / 1e6:.1f}M-parameter Llama, {record['data']['examples']} examples, "
            "effective batch " + str(record["recipe"]["batch"]) + "): " + ", ".join(parts) +
            f" (the stronger of its padded and padding-free collators in each of {record['repeats']} rotated rounds, "
            f"median and range; `benchmarks/train_throughput.py`, {record['date'][:16].replace('T', ' ')} UTC, "
            f"load average {load:.1f})")


SPEED_LINES: dict[str, Callable[[dict], str]] = {
    "study_speed.json": study_speed_line,
    "eval_speed.json": eval_speed_line,
    "compute_floor.json": compute_floor_line,
    "train_throughput.json": train_line,
    "merge.json": merge_line,
    "merge-no-input-hashes.json": merge_line,  # benchmarks/merge.py --no-input-hashes: mergekit writes no hashes
}


def speed_command(name: str) -> str:
    """How a benchmark's line names what measured it: `benchmarks/merge.py`, `benchmarks/merge.py --no-input-hashes`."""
    script, _, flag = Path(name).stem.partition("-no-")
    return f"benchmarks/{script}.py" + (f" --no-{flag}" if flag else "")


def speed(path: Path, old: str = "") -> str:
    """The benchmarks' ratios, from the JSON each wrote (--json) into one dir; a benchmark not run again keeps its
    line of the block as it was (`old`: each line names the script that measured it), so rerunning one benchmark
    rewrites its own line only."""
    found = [name for name in SPEED_LINES if (path / name).is_file()]
    if not found:
        raise KnowstackError(f"no benchmark output here (expected one of {', '.join(SPEED_LINES)})", path=path,
                             field="--speed")
    lines = [SPEED_LINES[name](json.loads((path / name).read_text())) if name in found else kept
             for name in SPEED_LINES for kept in [_line_citing(old, speed_command(name))]
             if name in found or kept]
    return "Speed, as ratios: each line is one run of one benchmark on this machine (its date at the end), both sides measured side by side in it, alternating; [a-b] is the range over its repeats:\n\n" + "\n".join(lines)


def _line_citing(block: str, script: str) -> str:
    """The block's list line that names `script`, or ''."""
    return next((line for line in block.splitlines() if line.startswith("- ") and f"`{script}`" in line), "")


def _count(n: float) -> str:
    """1.24B, 1.1M, 598,336: a parameter count as the docs write it."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def _gib(value: object) -> str:
    return f"{value:.1f} GiB" if isinstance(value, float | int) else str(value)


def _run_cell(run: dict) -> str:
    """One side of a training step: tokens/s and MFU, or why there is none."""
    if "error" in run:
        return f"failed ({run['error'][:80]})"
    mfu = run.get("mfu")
    mfu_text = f"MFU {mfu:.0%}" if isinstance(mfu, float) else f"MFU {mfu}"
    return f"{run['tokens_per_second']:,.0f} tokens/s, {mfu_text}"


def _estimate_cell(estimate: dict | None, measured: object) -> str:
    if not estimate or "gib" not in estimate:
        return f"failed ({(estimate or {}).get('error', 'none')[:80]})"
    ratio = (f" ({measured / estimate['gib']:.2f}x)", f" ({measured / estimate['at_longest_row_gib']:.2f}x)") \
        if isinstance(measured, float) else ("", "")
    return (f"{estimate['gib']:.1f} GiB{ratio[0]}; {estimate['at_longest_row_gib']:.1f} GiB at the longest row "
            f"({estimate['longest_row_tokens']:,} tokens){ratio[1]}")


def _train_row(case: dict) -> str:
    if "knowstack" not in case or "params" not in case:
        error = case.get("error") or case.get("knowstack", {}).get("error", "?")
        return f"| {case['name']} | failed ({error[:80]}) | | | | | |"
    peers = case.get("peers", {})
    ratio = case.get("ratio_vs_stronger_peer")
    ratio_text = f"**{ratio:.2f}x** ({case['stronger_peer']})" if ratio is not None else "none"
    ours = case["knowstack"]
    steps = case["timed_steps"]
    setting = (f"{_count(case['params'])} parameters, {case['batch']} examples a step, micro-batch {case['micro']}, "
               f"{steps} timed step{'s' if steps != 1 else ''}")
    return (f"| {case['name']} ({setting}) | {_run_cell(ours)} | {_run_cell(peers.get('padded', {'error': 'not run'}))} "
            f"| {_run_cell(peers.get('flattening', {'error': 'not run'}))} | {ratio_text} | "
            f"{_gib(ours.get('peak_gpu_memory_gib'))} | {_estimate_cell(case.get('estimate'), ours.get('peak_gpu_memory_gib'))} |")


def _unmeasured(what: str, record: dict | None) -> str | None:
    """A scale-check part's line where it did not run or failed; None where it has numbers."""
    if not record:
        return f"- {what}: not run"
    return f"- {what}: failed ({record['error'][:120]})" if "error" in record else None


def _generation_line(gen: dict | None) -> str:
    if (line := _unmeasured("generation", gen)) is not None:
        return line
    assert gen is not None
    return (f"- greedy generation, {gen['model']} in {gen['dtype']}, {gen['prompts']} prompts in batches of {gen['batch']}, "
            f"{gen['max_new_tokens']} new tokens (the paper protocol's budget: {gen['paper_budget']}): knowstack "
            f"{gen['knowstack']['tokens_per_second']:,.0f} new tokens/s, HF `generate` "
            f"{gen['hf_generate']['tokens_per_second']:,.0f}: **{gen['ratio']:.2f}x**; {gen['same_outputs']} of "
            f"{gen['prompts']} outputs identical" + _rows_saved(gen["knowstack"]))


def _rows_saved(side: dict) -> str:
    """What knowstack's generation did not compute for rows that had finished (runs before it was measured: '')."""
    if "row_tokens_saved" not in side:
        return ""
    whole = side["row_tokens"] + side["row_tokens_saved"]
    return f"; finished rows left the batch: {side['row_tokens_saved'] / whole:.0%} of the row-tokens not computed"


def _merge_line(merge: dict | None) -> str:
    if (line := _unmeasured("merge", merge)) is not None:
        return line
    assert merge is not None

    def side(run: object) -> str:
        if not isinstance(run, dict):
            return str(run)
        if "error" in run:
            return f"failed ({run['error'][:80]})"
        return (f"{run['wall_s']:.1f} s wall ({run['cpu_s']:.1f} s CPU, peak memory "
                f"{run['peak_rss_per_checkpoint']:.2f} checkpoints)")

    ratio = merge.get("ratio_vs_mergekit")
    return (f"- average of {merge['models']} x {merge['model']} ({_count(merge['params'])} parameters, "
            f"{merge['checkpoint_gb']:.3g} GB each in bf16; {merge['variant']}): knowstack {side(merge['knowstack'])}; "
            f"mergekit {side(merge['mergekit'])}" + (f": **{ratio:.2f}x** mergekit's wall time" if ratio else ""))


def scale(path: Path) -> str:
    """The GPU scale check (benchmarks/scale_check.py --json): training, generation and merge at real sizes."""
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("benchmark") != "scale_check":
        raise KnowstackError("not a scale check's output (benchmarks/scale_check.py --json)", path=path, field="--scale")
    device, date = record["device"], record["date"][:16].replace("T", " ")
    peak = device["peak_bf16_tflops"]
    peak_text = f"dense bf16 peak {peak:.0f} TFLOP/s" if isinstance(peak, float | int) else f"bf16 peak {peak}"
    what = ("the tiny preset on the CPU (2-layer models of a few MB): a check that the script runs end to end, not a "
            "measurement" if record["preset"] == "tiny" else "random-initialised models built from their config.json, "
            "one run of each side")
    commit = f", commit `{record['commit']}`" if record.get("commit") else ""
    lines = [f"Measured by `scripts/scale-check.sh` on {device['name']} ({peak_text}), {date} UTC{commit}; torch "
             f"{device['torch']}, transformers {device['transformers']}, peft {device['peft']}; {what}.", "",
             "| training step | knowstack | HF Trainer + PEFT, padded | HF Trainer + PEFT, padding-free | knowstack / "
             "the stronger | peak GPU memory | dry-run estimate (measured / estimate) |", "|---|---|---|---|---|---|---|"]
    lines += [_train_row(case) for case in record["train"]]
    formulas = [f"{case['finetune'].upper() if case['finetune'] == 'fft' else 'LoRA'}: {case['flops_formula']}"
                for case in record["train"] if "flops_formula" in case]
    weights = sorted({case["weights"] for case in record["train"] if "weights" in case})
    lines += ["", f"Tokens are real tokens (no padding) of the steps after the warm-up; MFU counts {'; '.join(formulas)}, "
              f"the same for every side, so its ratio is that of tokens/s. Weights: {', '.join(weights)}, on every side. "
              "The dry run's estimate assumes every row holds micro-batch x max_length tokens; beside it, the same "
              "formula at this run's longest packed row.", ""]
    for case in record["train"]:
        for label, run in case.get("peers", {}).items():
            if label not in ("padded", "flattening") and "tokens_per_second" in run:
                lines.append(f"- {case['name']}, HF Trainer + PEFT {label}: {_run_cell(run)}, peak GPU memory "
                             f"{_gib(run.get('peak_gpu_memory_gib'))}")
    lines += [_generation_line(record.get("generation")), _merge_line(record.get("merge"))]
    return "\n".join(lines)


FAMILY_COLUMNS = {"train-fft": "train FFT", "train-lora": "train LoRA", "merge-average": "average merge",
                  "merge-ties": "TIES merge", "moe-fft": "FFT-MoE", "moe-lora": "LoRA-MoE", "eval": "eval",
                  "lm-eval": "lm-eval", "contribute": "contribute", "compose": "compose"}


def family_cell(outcome: dict) -> str:
    if outcome["outcome"] == "works":
        shown = outcome.get("class") or (", ".join(outcome["targets"]) if "targets" in outcome else "")
        return f"yes ({shown})" if shown else "yes"
    if outcome["outcome"] == "refused":
        return "refused before any compute"
    return "**fails**"


def families(path: Path) -> str:
    """The families x features table, from the outcomes tests/test_families.py wrote (KNOWSTACK_FAMILIES_JSON)."""
    from knowstack.modeling.families import family_of

    record = json.loads(path.read_text())
    features = [name for name in record["features"] if name in FAMILY_COLUMNS]
    lines = ["| checkpoint | model_type | tied | " + " | ".join(FAMILY_COLUMNS[f] for f in features) + " |",
             "|---" * (3 + len(features)) + "|"]
    for name, row in record["families"].items():
        cells = [family_cell(row[f]) if f in row else "not run" for f in features]
        lines.append(f"| {name} | {row['model_type']} | {'yes' if row['tied'] else 'no'} | " + " | ".join(cells) + " |")
    notes = []
    for name, row in record["families"].items():
        known = family_of(row["model_type"])
        refused = [f"{FAMILY_COLUMNS[f]}: {row[f]['reason']}" for f in features
                   if f in row and row[f]["outcome"] == "refused"]
        if known is not None or refused:
            notes.append(f"- **{name}**: " + "; ".join(([known.note] if known is not None and known.note else [])
                                                       + refused))
    return ("\n".join(lines) + f"\n\nFrom `tests/test_families.py` (written by `make docs-families`), "
            f"{record['date']}, transformers {record['transformers']}. What sets each family apart, and "
            "why a feature is refused:\n\n" + "\n".join(notes))
PAPER_CONFIG = Path(knowstack.__file__).parent / "configs" / "paper" / "llama3-8b-trace.yaml"
TRACE_FIXTURES = ROOT / "tests" / "fixtures" / "trace"  # small files in the real TRACE, MetaMath, GSM8K shapes


def paper_config_on(config_dir: Path, where: Path) -> Path:
    """The paper config with its base given by `config_dir` (a config.json) and its tasks pointed at the TRACE-shaped
    fixtures (the plan fingerprints task files; the memory estimate never reads them)."""
    raw = yaml.safe_load(PAPER_CONFIG.read_text())
    raw["base"]["model"] = str(config_dir.resolve())
    for task in raw["tasks"]:
        if task["format"] == "math":
            task["train_file"] = str(TRACE_FIXTURES / "math" / "metamathqa_train.json")
            task["test_file"] = str(TRACE_FIXTURES / "math" / "gsm8k_test.jsonl")
            task["eval_file"] = str(TRACE_FIXTURES / "math" / "gsm8k_train.json")
        else:
            task["path"] = str(TRACE_FIXTURES / Path(task["path"]).name)
    path = where / "llama3-8b-trace.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def memory(config_dir: Path) -> str:
    """The dry run's memory estimate of the paper config, its base given by a config.json alone: one row per kind of
    step, then the FFT step's terms one by one, each computed by study/resources.py."""
    from knowstack.study.resources import (
        DEFAULT_GPU_MEMORY,
        FLOAT32,
        activation_terms,
        architecture_of,
        as_launched,
        estimate_plan,
    )

    if not (config_dir / "config.json").is_file():
        raise KnowstackError("no config.json here", path=config_dir, field="--memory")
    with tempfile.TemporaryDirectory() as where:
        config = load_config(paper_config_on(config_dir, Path(where)))
        estimates, _ = estimate_plan(build_plan(config))
        arch, _ = architecture_of(config)
    kinds: dict[tuple[str, int], list] = {}
    for step, estimate in estimates:
        kinds.setdefault((estimate.what, estimate.params), []).append((step, estimate))
    lines = ["| step | steps | parameters | weights | gradients | optimizer | activations | total | GPUs | as launched |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for (what, _), found in kinds.items():
        step, est = found[0]
        what = f"{what} (adapter unmerged)" if what == "eval" and step.params["model"].get("adapter") else what
        launched = as_launched(step, est, config)
        lines.append(f"| {what} | {len(found)} | {est.params:,} | {gib(est.weights)} | {gib(est.grads)} | "
                     f"{gib(est.optimizer)} | {gib(est.activations)} | {gib(est.total)} | "
                     f"{ {0: 'CPU', -1: 'too big'}.get(est.gpus, est.gpus)} | "
                     f"{'' if launched is None else f'{launched[0]} x {gib(launched[1])}'} |")
    fft = next(est for step, est in estimates if est.what == "train FFT")
    fft_step = next(step for step, est in estimates if est.what == "train FFT")
    tokens, width, per_token = activation_terms(arch, config, "fft")
    layers, logits = tokens * per_token * width, tokens * arch.vocab * (width + 2 * FLOAT32)
    assert layers + logits == fft.activations, "the worked example must add up to the estimate"
    processes, per_gpu = as_launched(fft_step, fft, config)
    name = config_dir.resolve().relative_to(ROOT).as_posix() if config_dir.resolve().is_relative_to(ROOT) else config_dir
    return "\n".join([
        f"The paper config with its base given by a config.json alone (`{name}`, {arch.params:,} parameters counted on "
        f"the meta device), on GPUs of {DEFAULT_GPU_MEMORY / 2**30:g} GiB, one row per kind of step (GiB; weights, "
        "gradients, optimizer and total unsharded; GPUs: the fewest that hold the step fully sharded; as launched: "
        "processes x GiB per GPU under the config's `launch` section):", "", *lines, "",
        f"One FFT step, term by term: weights {fft.weights // fft.params} B ({config.training.precision}) x "
        f"{fft.params:,} = {gib(fft.weights)} GiB; gradients the "
        f"same, {gib(fft.grads)} GiB; AdamW's two moments {gib(fft.optimizer)} GiB; activations for "
        f"{config.training.micro_batch_size} x {config.training.max_length} = {tokens:,} tokens: {per_token:,} "
        f"elements per token over the {arch.layers} layers x {width} B (bf16) = {gib(layers)} GiB, plus the logits "
        f"{tokens:,} x {arch.vocab:,} x ({width} + 8) B = {gib(logits)} GiB, {gib(fft.activations)} GiB in all; "
        f"{gib(fft.total)} GiB unsharded, {fft.gpus} GPUs at least; under FSDP on {processes}: "
        f"({gib(fft.weights)} + {gib(fft.grads)} + {gib(fft.optimizer)}) / {processes} + {gib(fft.activations)} = "
        f"{gib(per_gpu)} GiB per GPU.",
    ])


def vocabulary(_: object) -> str:
    """docs/commands.md's vocabulary: every option of every command, its one meaning, and its old names."""
    from knowstack.cli import build_parser
    from knowstack.cli.vocabulary import vocabulary_table

    return vocabulary_table(build_parser())


def merge_options(_: object) -> str:
    """docs/methods.md's table of the merge options, from their one declaration each (combine/merges/)."""
    from knowstack.combine.merges import options_table

    return options_table()


def claims(_: object) -> str:
    """docs/claims.md's table: every claim, the paper's sentence it tests and its comparison, from claims.py."""
    from knowstack.report.claims import claims_markdown

    return claims_markdown()


def search_results(study: Study) -> str:
    """docs/search.md's numbers: each search of configs/builtin-search.yaml's study (its trials, the chosen point)
    and its test comparison with the study's best merge and the base, with the report's own verdict."""
    from knowstack.report.figures import FigureSpec
    from knowstack.report.markdown import block_markdown
    from knowstack.report.search import search_sections
    from knowstack.results import PER_EXAMPLE, STUDY_INFO, read_items, read_study_info

    info = read_study_info(study.path / STUDY_INFO)
    if info is None or not info.searches:
        raise KnowstackError("no search in this study (study.json has none): run configs/builtin-search.yaml",
                             path=study.path, field="--search")
    scores = Scores.from_rows(study.rows, info.task_order, info.old_metric, read_items(study.path / PER_EXAMPLE))
    runs = [run for run in find_runs(scores) if not run.point]
    blocks = [b for b in search_sections(scores, runs, info.searches) if not isinstance(b, FigureSpec)]
    return "\n\n".join([*(block_markdown(b, 3, study.path).strip() for b in blocks), f"({study.provenance()})"])


def search_baselines(study: Study) -> str:
    """docs/methods.md's numbers of EWC and LwF: the continual table and the baselines' comparisons of
    configs/builtin-search.yaml's study, as its report wrote them (tables/continual.md, tables/baselines.md)."""
    tables = [study.path / "tables" / name for name in ("continual.md", "baselines.md")]
    missing = [path.name for path in tables if not path.is_file()]
    if missing:
        raise KnowstackError(f"no tables/{missing[0]}: the study has no report with EWC or LwF yet (`knowstack "
                             "report`)", path=study.path, field="--search")
    return "\n\n".join([*(path.read_text(encoding="utf-8").strip() for path in tables), f"({study.provenance()})"])


@dataclass(frozen=True)
class Generator:
    sources: tuple[str, ...]  # the options naming the results dir it may read, the first given wins
    make: Callable[..., str]
    reads_old: bool = False  # make(input, the block's text as it is): it keeps what its input does not renew


BLOCKS: dict[str, Generator] = {
    "demo-base": Generator(("base", "demo"), demo_base),
    "demo-time": Generator(("demo",), demo_time),
    "demo-study": Generator(("demo",), demo_study),
    "quick-all": Generator(("quick_all",), demo_study),
    "full": Generator(("full",), demo_study),
    "registry-scenario": Generator(("registry",), registry_scenario),
    "world-spread": Generator(("spread",), world_spread),
    "kernel-spread": Generator(("kernel_paths",), kernel_spread),
    "verdict-spread": Generator(("verdicts",), verdict_spread),
    "catalog": Generator(("catalog",), catalog),
    "speed": Generator(("speed",), speed, reads_old=True),
    "scale": Generator(("scale",), scale),
    "families": Generator(("families",), families),
    "memory": Generator(("memory",), memory),
    "vocabulary": Generator(("vocabulary",), vocabulary),
    "claims": Generator(("claims",), claims),
    "merge-options": Generator(("merge_options",), merge_options),
    "search": Generator(("search",), search_results),
    "search-baselines": Generator(("search",), search_baselines),
}
READERS: dict[str, Callable[[Path, str], object]] = {
    "demo": lambda p, o: Study.read(p, o),
    "base": lambda p, o: Study.read(p, o),
    "quick_all": lambda p, o: Study.read(p, o),
    "full": lambda p, o: Study.read(p, o),
    "catalog": lambda p, o: Study.read(p, o),
    "search": lambda p, o: Study.read(p, o),
    "registry": lambda p, o: p,
    "speed": lambda p, o: p,
    "scale": lambda p, o: p,
    "families": lambda p, o: p,
    "kernel_paths": lambda p, o: p,
    "memory": lambda p, o: p,
    "vocabulary": lambda p, o: p,
    "claims": lambda p, o: p,
    "merge_options": lambda p, o: p,
    "spread": lambda ps, o: [Study.read(p, o) for p in ps],
    "verdicts": lambda ps, o: [Study.read(p, o) for p in ps],
}
FILE_OPTIONS = {"scale", "families", "kernel_paths"}  # options naming a file, not a results dir
FLAG_OPTIONS = {"vocabulary", "claims", "merge_options"}  # options naming nothing: their blocks are read from the code


def rewrite(text: str, inputs: dict[str, object], where: Path) -> tuple[str, list[str], list[str]]:
    """The text with every block whose input is given regenerated; the names rewritten and kept."""
    written, kept = [], []

    def block(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KnowstackError(f"unknown numbers block '{name}' (known: {', '.join(BLOCKS)})", path=where)
        source = next((option for option in BLOCKS[name].sources if option in inputs), None)
        if source is None:
            kept.append(name)
            return match[0]
        written.append(name)
        generator = BLOCKS[name]
        made = generator.make(inputs[source], match["body"]) if generator.reads_old else generator.make(inputs[source])
        return f"{match[1]}{made.rstrip()}\n{match[4]}"

    return BLOCK.sub(block, text), written, kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, help="the demo's study dir (runs/demo)")
    parser.add_argument("--base", type=Path, help="a study dir of the demo's world with its base evaluated, for "
                        "the base's block alone (default: --demo)")
    parser.add_argument("--quick-all", type=Path, help="configs/builtin-quick-all.yaml's study dir")
    parser.add_argument("--full", type=Path, help="configs/builtin.yaml's study dir (the full world)")
    parser.add_argument("--catalog", type=Path, help="configs/builtin-catalog.yaml's study dir")
    parser.add_argument("--search", type=Path, help="configs/builtin-search.yaml's study dir (runs/search)")
    parser.add_argument("--speed", type=Path, help="a dir of the benchmarks' --json outputs (study_speed.json, ...)")
    parser.add_argument("--scale", type=Path, help="the GPU scale check's JSON (scripts/scale-check.sh: "
                        "scale-check.json)")
    parser.add_argument("--memory", type=Path, help="a dir holding a config.json (tests/fixtures/configs/llama-3-8b): "
                        "the dry run's memory estimate of the paper config with that base")
    parser.add_argument("--registry", type=Path, help="the registry scenario's registry (runs/registry-scenario/registry)")
    parser.add_argument("--spread", type=Path, nargs="+", help="study dirs of one built-in world built under "
                        "different thread counts or machines, each with its base evaluated")
    parser.add_argument("--verdicts", type=Path, nargs="+", help="study dirs of one config run under different "
                        "kernel paths (or machines), each with its report: the paper's findings' verdicts side by side")
    parser.add_argument("--kernel-paths", type=Path, nargs="+", help="JSON files scripts/kernel_paths.py wrote: a "
                        "world under several kernel paths and thread counts (a table each)")
    parser.add_argument("--families", type=Path, help="the JSON tests/test_families.py wrote (KNOWSTACK_FAMILIES_JSON)")
    parser.add_argument("--vocabulary", action="store_true", default=None,
                        help="docs/commands.md's table of options, from the command-line parsers")
    parser.add_argument("--claims", action="store_true", default=None,
                        help="docs/claims.md's table of the paper's findings, from src/knowstack/report/claims.py")
    parser.add_argument("--merge-options", action="store_true", default=None,
                        help="docs/methods.md's table of the merge options, from their declarations (combine/merges/)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose README.md and docs/ to rewrite")
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a block would change")
    args = parser.parse_args(argv)
    try:
        inputs = {}
        for option in READERS:
            given, flag = getattr(args, option), f"--{option.replace('_', '-')}"
            if given is None:
                continue
            for path in [] if option in FLAG_OPTIONS else given if isinstance(given, list) else [given]:
                if option in FILE_OPTIONS and not path.is_file():
                    raise KnowstackError("no such file", path=path, field=flag)
                if option not in FILE_OPTIONS and not path.is_dir():
                    raise KnowstackError("no such results dir", path=path, field=flag)
            inputs[option] = READERS[option](given, flag)
        if not inputs:
            raise KnowstackError("no results dir given (--demo, --base, --quick-all, --full, --catalog, --search, --registry, --spread, --verdicts, "
                                 "--speed, --memory, --families, --scale, --vocabulary, --claims, --merge-options, "
                                 "--kernel-paths)")
        changed = {}
        for name in doc_files(args.root):
            doc = args.root / name
            text = doc.read_text(encoding="utf-8")
            new, written, kept = rewrite(text, inputs, doc)
            if written or kept:  # pages without a block are not worth a line
                print(f"{name}: rewrote {', '.join(written) or 'nothing'}" + (f"; kept {', '.join(kept)}" if kept else ""))
            if new != text:
                changed[doc] = new
    except KnowstackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        print("changed: " + (", ".join(str(p) for p in changed) or "none"))
        return 1 if changed else 0
    for doc, text in changed.items():  # only once every block is generated: nothing half-written
        atomic_write_text(doc, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
