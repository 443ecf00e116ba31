"""Builds one built-in world under several CPU kernel paths and thread counts on this machine, and times
pretraining steps with MKL's reproducible mode on and off: the measurement behind docs/builtin-world.md's
spread table (`python scripts/docs_numbers.py --kernel-paths FILE` writes it from this script's output).

    python scripts/kernel_paths.py --out runs/kernel-paths.json [--preset test] [--threads 1 2] [--speed 3]
        [--mkl MODE ...] [--torch PATH ...] [--append]

A kernel path is a set of environment variables read when torch's libraries start: MKL_CBWR (MKL's
conditional numerical reproducibility; knowstack sets AVX2,STRICT unless it is set, and an empty value
is MKL's own default, CNR off), ATEN_CPU_CAPABILITY (torch's own vectorised kernels) and
ONEDNN_MAX_CPU_ISA (oneDNN's). Each build runs in a fresh process, so every variable takes effect.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

MKL_MODES = {"MKL default": "", "AVX2,STRICT": "AVX2,STRICT", "AVX2": "AVX2", "COMPATIBLE": "COMPATIBLE"}
TORCH_PATHS = {"default": {}, "ATen avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
               "oneDNN AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
               "ATen avx2 + oneDNN AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
VARIABLES = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# Run in the child: build the world on `threads` threads and print what world.json says of it.
BUILD = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from knowstack.builtin.world import build_world
world = json.loads((build_world(sys.argv[2], preset=sys.argv[3]) / "world.json").read_text())
print(json.dumps({k: world[k] for k in ("fingerprint", "hashes", "environment", "build_seconds")}))
"""

# Run in the child: seconds per pretraining step of the quick world's model (random tokens, its batch shape).
STEPS = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from knowstack.builtin.pretrain import ModelShape, PretrainSettings, model_config, pretraining_optimizer, pretraining_step
from transformers import LlamaForCausalLM
torch.manual_seed(0)
model = LlamaForCausalLM(model_config(ModelShape(), 4096, bos_token_id=1, eos_token_id=2, pad_token_id=0))
settings = PretrainSettings(steps=int(sys.argv[2]))
optimizer = pretraining_optimizer(model, settings)
batch = torch.randint(3, 4096, (settings.batch_size, settings.sequence_length))
pretraining_step(model, batch, optimizer)  # warm-up: first calls initialise the libraries
started = time.perf_counter()
for _ in range(settings.steps):
    pretraining_step(model, batch, optimizer)
print(json.dumps({"seconds_per_step": (time.perf_counter() - started) / settings.steps}))
"""


def child(code: str, variables: dict[str, str], *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    # Waiting threads asleep: on a loaded machine spinning ones make a 2-thread run many times slower.
    env.update(variables, TQDM_DISABLE="1", OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"failed with {variables}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def builds(preset: str, threads: list[int], mkl_modes: list[str], torch_paths: list[str], keep: Path | None,
           records: list[dict], save: Callable[[], None]) -> list[dict]:
    for mkl, torch_path, count in itertools.product(mkl_modes, torch_paths, threads):
        env = {"MKL_CBWR": MKL_MODES[mkl], **TORCH_PATHS[torch_path]}
        with tempfile.TemporaryDirectory() as tmp:
            where = keep / f"{mkl}-{torch_path}-{count}".replace(" ", "_").replace(",", "_") if keep else Path(tmp) / "w"
            world = child(BUILD, env, str(count), str(where), preset)
        records.append({"mkl": mkl, "torch": torch_path, "variables": env, "threads": count, **world})
        save()
        print(f"{mkl:12} {torch_path:24} threads {count}: {world['fingerprint']} ({world['build_seconds']} s)",
              file=sys.stderr)
    return records


def speed(rounds: int, threads: list[int], steps: int, records: list[dict], save: Callable[[], None]) -> list[dict]:
    """MKL's default and AVX2,STRICT alternately, `rounds` times, so that the machine's load falls on both alike."""
    for _, count, mkl in itertools.product(range(rounds), threads, ("MKL default", "AVX2,STRICT")):
        took = child(STEPS, {"MKL_CBWR": MKL_MODES[mkl]}, str(count), str(steps))
        records.append({"mkl": mkl, "threads": count, "steps": steps, **took})
        save()
        print(f"{mkl:12} threads {count}: {took['seconds_per_step'] * 1000:.0f} ms/step", file=sys.stderr)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the results file (JSON) to write")
    parser.add_argument("--preset", default="test", help="the built-in world's preset (default: test)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--speed", type=int, default=3, help="rounds of the speed comparison (0: none)")
    parser.add_argument("--steps", type=int, default=8, help="pretraining steps timed per round")
    parser.add_argument("--speed-threads", type=int, nargs="+", help="thread counts of the speed comparison "
                        "(default: --threads)")
    parser.add_argument("--mkl", nargs="+", choices=list(MKL_MODES), default=list(MKL_MODES), help="MKL modes to build on")
    parser.add_argument("--torch", nargs="+", choices=list(TORCH_PATHS), default=list(TORCH_PATHS),
                        help="ATen / oneDNN paths to build on")
    parser.add_argument("--speed-only", action="store_true", help="no builds: only the speed comparison")
    parser.add_argument("--append", action="store_true", help="add to --out's builds and timings, if it exists")
    parser.add_argument("--keep", type=Path, help="keep each world under this dir (default: built in a temporary dir)")
    args = parser.parse_args(argv)
    import torch

    from knowstack.kernels import cpu_model

    result: dict = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                                "torch": torch.__version__, "preset": args.preset,
                                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")},
                    "builds": [], "speed": []}
    if args.append and args.out.is_file():  # more kernel paths into the same measurement
        result = json.loads(args.out.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every measurement: a long run stopped early keeps what it measured
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    if not args.speed_only:
        builds(args.preset, args.threads, args.mkl, args.torch, args.keep, result["builds"], save)
    speed(args.speed, args.speed_threads or args.threads, args.steps, result["speed"], save)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
