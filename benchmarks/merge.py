"""Model merging: knowstack's streamed merges vs mergekit on the same synthetic Llama checkpoints.

The script builds a random Llama-architecture base of at least 1 GB (float32 safetensors, sharded
like a hub checkpoint) and `--models` fine-tuned variants (the base plus small random changes),
then runs the same merges with both tools, each as its own command-line process:

    linear / average   mergekit `linear` (weights 1, normalize)  vs  `knowstack merge --method average`
    TIES               mergekit `ties` (density d, weights 1)   vs  `knowstack merge --method ties`
    task arithmetic, SLERP, breadcrumbs, DELLA, Model Stock: the same (the seven methods both have, by default);
    with --methods any other method mergekit has (MERGEKIT_EQUIVALENTS below)

Each method runs `--repeats` times with each tool, alternating (knowstack then mergekit, then mergekit then
knowstack, ...: a drift of the machine's load falls on both), after one read of every input so that the inputs
are in the page cache for every run (the share of their bytes there is measured before each run, with util-linux
`fincore` where it exists, and printed); outputs are deleted between runs, outside the timing. It prints, per
method, the median wall time of each tool, the median and range (min-max) of the per-repeat ratio knowstack /
mergekit, the same ratio of CPU time (user + system, which a loaded machine disturbs less than wall time), the
largest absolute difference over every tensor, how many entries differ, and each process's peak RSS divided by
the size of one input checkpoint (the largest over its runs), with the machine's load average before and after.
`--json PATH` writes the same figures for a script. float32 throughout, so that both tools compute in the
checkpoint's own precision and the comparison is exact; TIES can differ only where a task vector's magnitude ties
the k-th largest exactly (mergekit keeps an arbitrary subset of such entries, knowstack keeps them all).

mergekit pins its own dependencies, so it gets its own virtual environment, created on first use
(torch==2.13.0, the CPU build, is installed first so that no CUDA build is pulled; then mergekit):

    .venv/bin/python benchmarks/merge.py [--models 3] [--layers 20] [--density 0.2] [--repeats 3]
        [--methods average ties ...] [--mergekit-venv ~/.cache/knowstack/mergekit-venv] [--workdir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from knowstack.combine.merges import MERGE_METHOD_OPTIONS, get_method
from knowstack.modeling.streaming import SafetensorsReader

TORCH_PIN = "torch==2.13.0"
MERGEKIT_PIN = "mergekit==0.1.5"  # the version the oracle tests (tests/test_merge_oracle.py) compare with
DEFAULT_VENV = Path.home() / ".cache" / "knowstack" / "mergekit-venv"
KNOWSTACK = Path(sys.executable).with_name("knowstack")


# --- mergekit's own environment -------------------------------------------------------------------
def ensure_mergekit(venv: Path) -> Path | None:
    """mergekit-yaml in its own venv, created if missing; None (with the reason printed) if it cannot be."""
    exe, problem = install_mergekit(venv)
    if problem:
        print(problem)
    return exe


# pip's words for an index it cannot reach (no network, or no PyPI behind the configured index)
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Network is unreachable",
               "Temporary failure in name resolution", "No matching distribution found", "Could not find a version")


def install_mergekit(venv: Path) -> tuple[Path | None, str]:
    """(mergekit-yaml of mergekit 0.1.5 in its own venv, created or brought to the pin if needed; "") or (None,
    why not: pip's command and output)."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.is_file() and _installed_version(venv) == MERGEKIT_PIN.split("==")[1]:
        return exe, ""
    print(f"creating mergekit's venv in {venv} (torch pinned first, then mergekit) ...", file=sys.stderr)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "--quiet", TORCH_PIN],
             [str(venv / "bin" / "pip"), "install", "--quiet", MERGEKIT_PIN]]
    for command in steps:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            return None, (f"mergekit could not be installed: `{' '.join(command)}` exited {result.returncode}:\n"
                          f"{result.stderr.strip()[-2000:]}")
    return (exe, "") if exe.is_file() else (None, f"pip installed {MERGEKIT_PIN} but left no {exe}")


def _installed_version(venv: Path) -> str | None:
    result = subprocess.run([str(venv / "bin" / "python"), "-c",
                             "import importlib.metadata as m; print(m.version('mergekit'))"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


# --- synthetic checkpoints ------------------------------------------------------------------------
def llama_config(layers: int) -> LlamaConfig:
    # Llama-family proportions (GQA, SwiGLU MLP, untied head) at ~1/4 the width of Llama-3-8B.
    return LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False, dtype="float32", architectures=["LlamaForCausalLM"])


def shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_checkpoint(out: Path, config: LlamaConfig, tensor_shapes: dict[str, tuple[int, ...]], seed: int,
                     base_seed: int | None = None, shard_bytes: int = 400 * 2**20, *,
                     dtype: torch.dtype = torch.float32, device: str = "cpu") -> int:
    """Base (base_seed None): N(0, 0.02) weights, norms 1. Variant: the base plus N(0, 0.002) changes.
    Written in shards with an index, like a hub checkpoint, in `dtype` (drawn in float32 on `device`: a GPU draws
    an 8B model's numbers in a blink); returns the bytes of weights written."""
    out.mkdir(parents=True)
    config.save_pretrained(out)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files: list[str] = []
    total = 0

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)
        shard.clear()

    for i, (name, shape) in enumerate(tensor_shapes.items()):
        tensor = _base_tensor(name, shape, base_seed if base_seed is not None else seed, i, device)
        if base_seed is not None:
            gen = torch.Generator(device=device).manual_seed(seed * 100_003 + i)
            tensor.add_(torch.randn(shape, generator=gen, device=device), alpha=0.002)
        shard[name] = tensor = tensor.to(dtype).cpu()
        total += tensor.nbytes
        if sum(t.nbytes for t in shard.values()) >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _base_tensor(name: str, shape: tuple[int, ...], seed: int, i: int, device: str = "cpu") -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    generator = torch.Generator(device=device).manual_seed(seed * 100_003 + i)
    return torch.randn(shape, generator=generator, device=device).mul_(0.02)


# --- running and measuring ------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One timed process: wall and CPU (user + system) seconds, peak RSS in bytes, the share of the inputs' bytes in
    the page cache just before it started (None where it cannot be measured) and the 1-minute load average then."""

    wall_s: float
    cpu_s: float
    peak_rss: int
    inputs_cached: float | None
    load1: float


def timed(command: list[str], inputs: list[Path]) -> Run:
    """Wall and CPU seconds (its own rusage) and peak RSS (bytes) of one child process."""
    cached, load1 = page_cache_share(inputs), os.getloadavg()[0]
    # stderr to a file, not a pipe: a process that writes more than a pipe holds (a progress bar over a long merge)
    # would block on the full pipe while this one waits for it to end
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        peak = PeakRss(process.pid)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"`{' '.join(command)}` failed:\n{stderr[-3000:]}")
    return Run(wall, usage.ru_utime + usage.ru_stime, peak.stop() or usage.ru_maxrss * 1024, cached, load1)


class PeakRss:
    """A child's peak resident memory, read from its VmHWM (/proc/PID/status) every 20 ms while it runs.

    Not rusage's ru_maxrss: Linux carries the parent's high-water mark into a child it spawns (fork, or vfork as
    Python's subprocess uses, then exec), so a child of a 1.9 GB process reports 1.9 GB even for `python -c pass`.
    VmHWM is the exec'd program's own. stop() returns None where /proc cannot be read (another OS)."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.path, self.interval, self.peak = Path(f"/proc/{pid}/status"), interval, None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.is_set():
            try:
                line = next((x for x in self.path.read_text().splitlines() if x.startswith("VmHWM:")), None)
            except OSError:
                line = None  # not yet, or gone
            if line is not None:
                self.peak = max(self.peak or 0, int(line.split()[1]) * 1024)
            self.done.wait(self.interval)

    def stop(self) -> int | None:
        self.done.set()
        self.thread.join()
        return self.peak


def ratio_summary(ours: list[float], theirs: list[float]) -> dict[str, float | int]:
    """The per-repeat ratios ours[i] / theirs[i] (runs i of the two tools ran next to each other): their median,
    min and max, and how many."""
    if not ours or len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} runs against {len(theirs)}: one of each per repeat")
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)}


def page_cache_share(models: list[Path]) -> float | None:
    """The share of the models' safetensors bytes in the page cache (util-linux fincore); None without fincore."""
    files = [str(f) for model in models for f in sorted(model.glob("*.safetensors"))]
    if not files or shutil.which("fincore") is None:
        return None
    result = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *files],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return None
    resident = size = 0
    for line in result.stdout.split("\n"):
        if line.strip():
            res, total = line.split()
            resident, size = resident + int(res), size + int(total)
    return min(1.0, resident / size) if size else None  # fincore counts whole pages: a file's last one is part


# knowstack's merge methods and mergekit 0.1.5's equivalents: (mergekit's name, its global parameters). Methods left
# out have none (dare and ties-dare: mergekit's dare_linear / dare_ties rescale to the L1 norm, not by 1/(1-p)).
MERGEKIT_EQUIVALENTS: dict[str, tuple[str, dict]] = {
    "average": ("linear", {"normalize": True}),
    "task-average": ("task_arithmetic", {"normalize": True}),
    "ties": ("ties", {"normalize": True}),
    "task-arithmetic": ("task_arithmetic", {}),
    "breadcrumbs": ("breadcrumbs", {}),
    "breadcrumbs-ties": ("breadcrumbs_ties", {}),
    "della": ("della", {}),
    "della-linear": ("della_linear", {}),
    "slerp": ("slerp", {}),
    "multislerp": ("multislerp", {}),
    "karcher": ("karcher", {}),
    "model-stock": ("model_stock", {}),
}
# the ones a merge of whole checkpoints can compare entry by entry (the others draw at random: their outputs differ
# by the draws, and tests/test_merge_oracle.py compares them with the same draws, a tensor at a time)
DETERMINISTIC = [m for m in MERGEKIT_EQUIVALENTS if not m.startswith("della")]
# the methods knowstack shares with mergekit that issue 34 times (the default)
SHARED = ["average", "ties", "task-arithmetic", "slerp", "breadcrumbs", "della", "model-stock"]
# the knowstack options each mergekit method reads, per model (tensor parameters) or for the merge
_PER_MODEL = {"density": "density", "gamma": "gamma", "epsilon": "epsilon"}
_GLOBAL = {"lambda": "lambda", "t": "t", "max_iter": "max_iter", "tol": "tol"}


def mergekit_config(method: str, base: Path | str, models: list[Path | str], weights: list[float] | None = None,
                    options: dict | None = None, dtype: str = "float32", out_dtype: str | None = None) -> str:
    """mergekit's YAML for knowstack's `method` on the same inputs and settings. options: knowstack's option names
    and values (knowstack's defaults for the ones not given); weights: one per model (default 1). slerp's first
    model is mergekit's base_model (t = 0 gives it); average and karcher take no base. dtype: what mergekit computes
    in; out_dtype: what it writes (default dtype)."""
    from knowstack.combine.merges import MERGE_METHOD_OPTIONS, MergeOptions, get_method

    name, parameters = MERGEKIT_EQUIVALENTS[method]
    chosen = get_method(method)
    settings = MergeOptions.from_settings(options or {})
    read = MERGE_METHOD_OPTIONS[method]
    weights = list(weights) if weights is not None else [1.0] * len(models)
    entries = []
    for model, weight in zip(models, weights, strict=True):
        params = {mk: settings.value(ours) for ours, mk in _PER_MODEL.items() if ours in read}
        if chosen.weighted and method != "karcher":  # mergekit's karcher weighs equally and reads no weight
            params["weight"] = weight
        entries.append({"model": str(model), "parameters": params} if params else {"model": str(model)})
    config: dict = {"merge_method": name, "models": entries, "dtype": dtype, "out_dtype": out_dtype or dtype,
                    "parameters": {**parameters, **{mk: settings.value(ours) for ours, mk in _GLOBAL.items()
                                                     if ours in read}}}
    if method == "slerp":
        config["base_model"] = str(models[0])
    elif chosen.uses_base:
        config["base_model"] = str(base)
    return json.dumps(config)  # JSON is YAML


def compare(ours: Path, theirs: Path) -> tuple[float, int, int]:
    """Max |difference| over all tensors, the number of entries that differ, and the number of entries."""
    a, b = SafetensorsReader.from_dir(ours), SafetensorsReader.from_dir(theirs)
    if set(a.specs) != set(b.specs):
        raise SystemExit(f"tensor names differ: {sorted(set(a.specs) ^ set(b.specs))[:5]}")
    worst, differing, total = 0.0, 0, 0
    for name in a.names():
        x, y = a.read(name).float(), b.read(name).float()
        if x.shape != y.shape:
            raise SystemExit(f"{name}: shapes {tuple(x.shape)} vs {tuple(y.shape)}")
        diff = (x - y).abs()
        worst = max(worst, float(diff.max()))
        differing += int((diff > 0).sum())
        total += diff.numel()
    return worst, differing, total


def warm(paths: list[Path]) -> None:
    """Read every input once, so that neither tool pays for the first read from disk."""
    for path in paths:
        for file in sorted(path.glob("*.safetensors")):
            with file.open("rb") as handle:
                while handle.read(64 * 2**20):
                    pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3, help="fine-tuned variants to merge")
    parser.add_argument("--layers", type=int, default=20, help="decoder layers (20: 1.15 GB in float32)")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool per method, alternating (the "
                                                               "ratio's median and range are over these)")
    parser.add_argument("--methods", nargs="+", default=SHARED, choices=list(MERGEKIT_EQUIVALENTS),
                        help="knowstack merge methods to compare with their mergekit equivalents (default: the seven "
                             "they share; knowstack's option defaults for the options the command line does not set). "
                             "DELLA's outputs differ by their random draws")
    parser.add_argument("--no-input-hashes", dest="input_hashes", action="store_false",
                        help="run knowstack with --no-input-hashes (its card without the inputs' sha256, as mergekit "
                             "here writes no card); by default it hashes its inputs as a user's merge does")
    parser.add_argument("--mergekit-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--workdir", type=Path, help="where checkpoints go (default: a temporary dir)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    mergekit = ensure_mergekit(args.mergekit_venv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="knowstack-merge-bench-"))
    try:
        results = run_benchmark(args, mergekit, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwritten: {args.json}")


def run_benchmark(args: argparse.Namespace, mergekit: Path | None, workdir: Path) -> dict:
    load_before = os.getloadavg()
    config = llama_config(args.layers)
    tensor_shapes = shapes(config)
    base = workdir / "base"
    models = [workdir / f"ft{i}" for i in range(args.models)]
    if not base.exists():
        write_checkpoint(base, config, tensor_shapes, seed=0)
        for i, model in enumerate(models, start=1):
            write_checkpoint(model, config, tensor_shapes, seed=i, base_seed=0)
    checkpoint = sum(f.stat().st_size for f in models[0].glob("*.safetensors"))
    params = sum(torch.Size(s).numel() for s in tensor_shapes.values())
    print(f"model: Llama, {params / 1e6:.0f}M params ({args.layers} layers, hidden 1024, vocab 32000), float32, "
          f"one checkpoint {checkpoint / 1e9:.2f} GB; {args.models} fine-tuned variants + base; "
          f"torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs; load average before "
          f"{_load(load_before)}")
    print(f"page cache: every input is read once before each method's runs (warm cache; machine memory "
          f"{_memory_gb():.0f} GB, inputs {(args.models + 1) * checkpoint / 1e9:.1f} GB); outputs are deleted "
          "between runs, outside the timing\n")

    runs = {}
    for method in args.methods:
        inputs = models[:2] if method == "slerp" else models
        command = [str(KNOWSTACK), "merge", "--method", method, "--models", *map(str, inputs)]
        if get_method(method).uses_base:
            command += ["--base", str(base)]
        if "density" in MERGE_METHOD_OPTIONS[method]:
            command += ["--density", str(args.density)]
        if not args.input_hashes:
            command += ["--no-input-hashes"]
        runs[method] = (command, inputs)
    print(f"{'method':7} {'knowstack s':>11} {'mergekit s':>10} {'ratio [range]':>19} {'cpu ratio':>9} "
          f"{'max|diff|':>10} {'differing':>14} {'RSS/ckpt ks':>11} {'RSS/ckpt mk':>11} {'cached':>6} {'load':>9}")
    results = []
    for label, (ours_cmd, inputs) in runs.items():
        theirs_cmd = None
        if mergekit is not None:
            mk_yaml = workdir / f"mergekit-{label}.yml"
            mk_yaml.write_text(mergekit_config(label, base, inputs, options={"density": args.density}))
            theirs_cmd = [str(mergekit), str(mk_yaml), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
        read = inputs + [base] if get_method(label).uses_base else inputs  # what both tools read
        result = compare_method(label, ours_cmd, theirs_cmd, read, workdir, args.repeats, checkpoint)
        results.append(result)
        print(format_row(result))
    print("\n(ratio = knowstack / mergekit wall time of the whole command: median of the per-repeat ratios [min-max]; "
          "cpu ratio: the same of user + system CPU seconds; goal <= 1.0x. RSS/ckpt = the process's peak resident "
          "memory / one input checkpoint's size, the largest over its runs; goal <= 1.5x for knowstack. cached: the "
          "least share of the inputs' bytes in the page cache before a run. load: 1-minute load average before and "
          "after the method's runs. Goals for max|diff|: <= 1e-6 for linear; TIES equal but for entries tied exactly "
          "at the k-th magnitude; DELLA's draw at random, so their entries differ by the draws)")
    load_after = os.getloadavg()
    print(f"load average after: {_load(load_after)}")
    return {"benchmark": "merge", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gb": _memory_gb(),
                        "platform": platform.platform(), "python": platform.python_version()},
            "load_average_before": list(load_before), "load_average_after": list(load_after),
            "settings": {"models": args.models, "layers": args.layers, "density": args.density,
                         "repeats": args.repeats, "parameters": params, "checkpoint_bytes": checkpoint,
                         "knowstack_input_hashes": args.input_hashes,
                         "mergekit": MERGEKIT_PIN if mergekit is not None else None},
            "page_cache": "inputs read once before each method's runs (warm); inputs_cached: the share of their "
                          "bytes in the page cache before each run (fincore), null where it cannot be measured",
            "methods": results}


def compare_method(label: str, ours_cmd: list[str], theirs_cmd: list[str] | None, inputs: list[Path], workdir: Path,
                   repeats: int, checkpoint: int) -> dict:
    """`repeats` runs of each tool, alternating which goes first, on warm inputs; then the outputs compared."""
    ours_out, theirs_out = workdir / f"ks-{label}", workdir / f"mk-{label}"
    tools = {"knowstack": [*ours_cmd, "--out", str(ours_out)]}
    if theirs_cmd is not None:
        tools["mergekit"] = [theirs_cmd[0], theirs_cmd[1], str(theirs_out), *theirs_cmd[2:]]
    outs = {"knowstack": ours_out, "mergekit": theirs_out}
    load_before = os.getloadavg()
    warm(inputs)
    runs: dict[str, list[Run]] = {tool: [] for tool in tools}
    for repeat in range(repeats):
        order = list(tools) if repeat % 2 == 0 else list(reversed(tools))
        for tool in order:
            shutil.rmtree(outs[tool], ignore_errors=True)
            runs[tool].append(timed(tools[tool], inputs))
    result: dict = {"method": label, "mergekit_method": MERGEKIT_EQUIVALENTS[label][0] if theirs_cmd else None,
                    "repeats": repeats, "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg())}
    for tool, timings in runs.items():
        cached = [r.inputs_cached for r in timings if r.inputs_cached is not None]
        result[tool] = {"wall_s": [r.wall_s for r in timings], "cpu_s": [r.cpu_s for r in timings],
                        "median_wall_s": statistics.median(r.wall_s for r in timings),
                        "peak_rss_per_checkpoint": max(r.peak_rss for r in timings) / checkpoint,
                        "inputs_cached": [r.inputs_cached for r in timings], "least_cached": min(cached, default=None),
                        "load1_before_runs": [r.load1 for r in timings]}
    if theirs_cmd is None:
        result.update(ratio=None, cpu_ratio=None, max_abs_diff=None, entries_differing=None, entries=None)
        shutil.rmtree(ours_out, ignore_errors=True)
        return result
    result["ratio"] = ratio_summary(result["knowstack"]["wall_s"], result["mergekit"]["wall_s"])
    result["cpu_ratio"] = ratio_summary(result["knowstack"]["cpu_s"], result["mergekit"]["cpu_s"])
    worst, differing, total = compare(ours_out, theirs_out)
    result.update(max_abs_diff=worst, entries_differing=differing, entries=total)
    for out in outs.values():  # compared: two checkpoints per method would fill a small disk over seven methods
        shutil.rmtree(out, ignore_errors=True)
    return result


def format_row(result: dict) -> str:
    ks, mk = result["knowstack"], result.get("mergekit")
    cached = [c for c in (ks["least_cached"], mk["least_cached"] if mk else None) if c is not None]
    load = f"{result['load_average_before'][0]:.1f}-{result['load_average_after'][0]:.1f}"
    cached_text = f"{min(cached):6.0%}" if cached else f"{'?':>6}"
    if result["ratio"] is None:
        return (f"{result['method']:7} {ks['median_wall_s']:11.1f} {'—':>10} {'—':>19} {'—':>9} {'—':>10} {'—':>14} "
                f"{ks['peak_rss_per_checkpoint']:11.2f} {'—':>11} {cached_text} {load:>9}")
    ratio, cpu = result["ratio"], result["cpu_ratio"]
    spread = f"{ratio['median']:.2f}x [{ratio['min']:.2f}-{ratio['max']:.2f}]"
    return (f"{result['method']:7} {ks['median_wall_s']:11.1f} {mk['median_wall_s']:10.1f} {spread:>19} "
            f"{cpu['median']:8.2f}x {result['max_abs_diff']:10.2e} "
            f"{result['entries_differing']:>7}/{result['entries'] / 1e6:.0f}M {ks['peak_rss_per_checkpoint']:11.2f} "
            f"{mk['peak_rss_per_checkpoint']:11.2f} {cached_text} {load:>9}")


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load) + " (1/5/15 min)"


def _memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


if __name__ == "__main__":
    main()
