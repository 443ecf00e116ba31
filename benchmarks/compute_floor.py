"""How fast a study could get without changing its numbers: the share of its time spent in fp32 matmul and attention
kernels, and how close to this machine's peak those kernels already run.

    .venv/bin/python benchmarks/compute_floor.py --study runs/demo [--samples 2] [--pretrain-steps 8] [--json PATH]

A finished study dir gives the seconds each kind of step took (artifacts/*/step.json "cost"). For each kind that ran
(train, eval, merge-adapter, ...) the benchmark re-runs `--samples` of its steps (those of median cost) here, in a
scratch study dir that links the finished artifacts, under torch's profiler (after one unprofiled run, as a study
pays libraries' one-time setup once); the built-in world's step is sampled by
`--pretrain-steps` steps of its pretraining on its own model and batch shape (and the rest of its build, timed). For each it measures the kernels'
self time (aten::mm, addmm, bmm, baddbmm and scaled-dot-product attention, forward and backward) as a share of the
step's wall time, and the GFLOP/s of its matmuls (the profiler's FLOP counts) against a large sgemm's on this machine
and thread count.

Every change that keeps a study's numbers identical keeps these kernels, on the same shapes, in the same precision:
it can remove the rest (Python, data handling, elementwise ops, idle cores) but not them, and a matmul already at the
machine's peak cannot run faster. So the study's kernel seconds (each kind's recorded seconds times its kernel share)
over its total seconds is the lowest ratio of today's time that any same-numbers change can reach; a speed target
below it needs other numbers (other kernels, precision, or less work), said as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the re-run steps' own bars, read when tqdm is first imported

import torch  # noqa: E402

KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_scaled_dot_product_efficient_attention",
           "aten::_scaled_dot_product_attention_math")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def recorded_seconds(study: Path) -> dict[str, list[tuple[float, str]]]:
    """{kind: [(seconds, key), ...]} from every finished step's step.json."""
    kinds: dict[str, list[tuple[float, str]]] = {}
    for path in sorted((study / "artifacts").glob("*/step.json")):
        record = json.loads(path.read_text())
        kinds.setdefault(record["kind"], []).append((float(record["cost"]["seconds"]), record["key"]))
    return kinds


def median_keys(steps: list[tuple[float, str]], samples: int) -> list[str]:
    """The keys of the `samples` steps nearest the median cost."""
    ordered = sorted(steps)
    middle = len(ordered) // 2
    picked = sorted(range(len(ordered)), key=lambda i: (abs(i - middle), i))[:samples]
    return [ordered[i][1] for i in sorted(picked)]


def kernel_profile(events: Iterable) -> tuple[float, float, float]:
    """(kernel self seconds, matmul self seconds, matmul GFLOP) from the profiler's per-op averages."""
    kernel = matmul = flops = 0.0
    for event in events:
        if event.key in KERNELS:
            kernel += event.self_cpu_time_total / 1e6
        if event.key in MATMULS:
            matmul += event.self_cpu_time_total / 1e6
            flops += (event.flops or 0) / 1e9
    return kernel, matmul, flops


def profiled(work: Callable[[], None]) -> dict[str, float]:
    """The work's wall seconds, kernel share and matmul GFLOP/s, under torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        started = time.perf_counter()
        work()
        wall = time.perf_counter() - started
    kernel, matmul, gflop = kernel_profile(prof.key_averages())
    return {"wall": wall, "kernel_share": min(1.0, kernel / wall), "matmul_gflops": gflop / matmul if matmul else 0.0}


def sgemm_peak(size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a large float32 matmul on this process's threads: what this machine's kernels can reach."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def scratch_study(study: Path, where: Path, rerun: set[str]) -> Path:
    """A study dir whose artifacts link the finished ones, but those to re-run."""
    scratch = where / "study"
    (scratch / "artifacts").mkdir(parents=True)
    shutil.copy2(study / "config.yaml", scratch / "config.yaml")
    for artifact in (study / "artifacts").iterdir():
        if artifact.name not in rerun and not artifact.name.startswith("."):
            (scratch / "artifacts" / artifact.name).symlink_to(artifact.resolve())
    return scratch


def step_runner(study: Path, key: str, where: Path) -> Callable[[], None]:
    """A function that runs the finished study's step `key` again, in a scratch study dir under `where`."""
    from knowstack.config import load_config
    from knowstack.study.plan import build_plan
    from knowstack.study.runner import context_for
    from knowstack.study.steps import execute

    scratch = scratch_study(study, where, {key})
    plan = build_plan(load_config(scratch / "config.yaml"), scratch)
    step = next(s for s in plan.ordered() if s.key == key)
    ctx = context_for(plan, scratch)
    return lambda: execute(step, ctx)


def pretraining_runner(study: Path, steps: int) -> tuple[Callable[[], None], float]:
    """A function that runs `steps` steps of the world's pretraining (its model, batch and window, random tokens), and
    the share of the world's build that pretraining takes: its steps at the time of one timed step, against that plus
    the rest of the build (corpus, tokenizer, token stream) timed now, under the same load."""
    from transformers import LlamaForCausalLM

    from knowstack.builtin.corpus import build_corpus
    from knowstack.builtin.pretrain import (
        PretrainSettings,
        pretraining_optimizer,
        pretraining_step,
        token_stream,
    )
    from knowstack.builtin.tokenizer import train_tokenizer
    from knowstack.builtin.world import PRESETS

    world = next((study / "artifacts").glob("*/world.json"))
    manifest = json.loads(world.read_text())
    preset = PRESETS[manifest["preset"]]
    started = time.perf_counter()
    corpus = build_corpus(preset.facts_per_family, preset.fact_repeats, preset.arithmetic_repeats, preset.text_chars,
                          manifest["seed"])
    token_stream(train_tokenizer(corpus.documents, preset.vocab_size), corpus.documents)
    rest = time.perf_counter() - started
    model = LlamaForCausalLM.from_pretrained(world.parent / "model")
    settings = PretrainSettings(steps=manifest["pretrain"]["steps"])
    optimizer = pretraining_optimizer(model, settings)
    batch = torch.randint(0, model.config.vocab_size, (settings.batch_size, settings.sequence_length))
    model.train()

    def one() -> None:
        pretraining_step(model, batch, optimizer)

    one()  # warm
    started = time.perf_counter()
    one()
    pretraining = (time.perf_counter() - started) * settings.steps
    return (lambda: [one() for _ in range(steps)]), pretraining / (pretraining + rest)


def floor(kinds: dict[str, dict[str, float]]) -> tuple[float, float]:
    """(kernel seconds, total seconds) over the kinds: each kind's recorded seconds times its kernel share."""
    total = sum(k["seconds"] for k in kinds.values())
    return sum(k["seconds"] * k["kernel_share"] for k in kinds.values()), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True, help="a finished study dir (e.g. runs/demo)")
    parser.add_argument("--samples", type=int, default=2, help="steps re-run per kind (default 2)")
    parser.add_argument("--pretrain-steps", type=int, default=8, help="pretraining steps sampled for the world")
    parser.add_argument("--json", type=Path, help="also write the outcome as JSON here")
    args = parser.parse_args(argv)
    study = args.study.resolve()
    if not (study / "config.yaml").is_file() or not (study / "artifacts").is_dir():
        print(f"error: {study}: not a finished study dir (no config.yaml or artifacts/)", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    peak = sgemm_peak()
    print(f"float32 sgemm 2048^3 on {torch.get_num_threads()} threads: {peak:.0f} GFLOP/s "
          f"(load average {os.getloadavg()[0]:.2f})", flush=True)
    kinds: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="knowstack-floor-") as tmp:
        for kind, steps in recorded_seconds(study).items():
            seconds = sum(s for s, _ in steps)
            if kind == "world":
                run, pretraining = pretraining_runner(study, args.pretrain_steps)
                sample = profiled(run)
                share = sample["kernel_share"] * pretraining
                gflops = [sample["matmul_gflops"]]
            else:
                keys = median_keys(steps, args.samples)
                step_runner(study, keys[0], Path(tmp) / f"warm-{kind}")()  # libraries' one-time setup, paid once in a study
                samples = [profiled(step_runner(study, key, Path(tmp) / key)) for key in keys]
                share = statistics.mean(s["kernel_share"] for s in samples)
                gflops = [s["matmul_gflops"] for s in samples]
            kinds[kind] = {"steps": len(steps), "seconds": seconds, "kernel_share": share,
                           "matmul_gflops": statistics.mean(gflops)}
            print(f"{kind:<14} {len(steps):>4} steps {seconds:>8.1f} s  kernels {share:>5.1%} of the time  "
                  f"matmuls at {kinds[kind]['matmul_gflops']:>5.0f} GFLOP/s ({kinds[kind]['matmul_gflops'] / peak:.0%} "
                  "of the sgemm)", flush=True)
    kernel_seconds, total = floor(kinds)
    print(f"\nkernels: {kernel_seconds:.0f} of the study's {total:.0f} step seconds: no change that keeps every number "
          f"can bring it below {kernel_seconds / total:.2f}x of its time (a matmul of the same shape runs the same kernel: "
          "only another kernel, so other sums, makes it faster)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "compute_floor", "study": str(study),
                                         "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "threads": torch.get_num_threads(), "sgemm_gflops": peak,
                                         "load": list(os.getloadavg()), "kinds": kinds,
                                         "floor_ratio": kernel_seconds / total}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
