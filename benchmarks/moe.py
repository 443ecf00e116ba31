"""MoE mixing: generation speed of the mixtures relative to their base, and the memory of building an FFT-MoE.

Speed: a random Llama of the built-in size (hidden 256, 4 layers, BPE-sized vocab 4096), 7 stand-ins for
one-round FFT models (the base plus small random changes) and 7 LoRA adapters (r 8 on every linear layer,
as the study trains them), mixed by knowstack into the 7-expert top-2 FFT-MoE (a Mixtral checkpoint) and
the top-2 LoRA-MoE over the 7 adapters. Each model greedily generates `--new-tokens` tokens (EOS
suppressed, so every model makes the same number) for `--prompts` prompts of random tokens in batches of
`--batch-size`; the three models take turns, `--repeats` times, and each keeps its best time, so a busy
machine slows them alike. Goal: LoRA-MoE >= 0.7x the base's tokens/s.

Memory: a synthetic Llama checkpoint (hidden 1024, `--mem-layers` layers, vocab 32000, bf16, written
tensor by tensor) and 7 variants of it; `knowstack mix` builds their 7-expert FFT-MoE (random routers: no
model is loaded) in its own process. Printed: that process's peak RSS divided by the size of one input
checkpoint, the same after subtracting the RSS of a process that only imports what `knowstack mix`
imports, and, for reference, the peak RSS of a process that loads one input model and reads its weights.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/moe.py [--batch-size 32] [--prompts 64] [--new-tokens 32]
        [--repeats 3] [--mem-layers 16] [--workdir DIR] [--skip-speed] [--skip-memory]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from knowstack.combine.moe import MoeOptions, mix_models
from knowstack.modeling.streaming import ShardedWriter
from knowstack.modelio import load_model

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- speed -----------------------------------------------------------------------------------------
def builtin_sized(root: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    return root / "base"


def fft_variant(base: Path, out: Path, seed: int) -> Path:
    model = LlamaForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    return out


def lora_adapter(base: Path, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)  # a trained adapter's B is not zero
    model.save_pretrained(out)
    return out


def generation_seconds(model: torch.nn.Module, prompts: torch.Tensor, batch_size: int, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            ids = prompts[i : i + batch_size]
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def speed(args: argparse.Namespace, root: Path) -> dict[str, float]:
    base = builtin_sized(root)
    models = [fft_variant(base, root / f"fft{i}", seed=i) for i in range(7)]
    adapters = [lora_adapter(base, root / f"lora{i}", seed=i) for i in range(7)]
    mix_models(base, models, root / "fft-moe", options=MoeOptions(top_k=2))
    mix_models(base, adapters, root / "lora-moe", options=MoeOptions(top_k=2))
    contenders = {
        "base (LlamaForCausalLM)": load_model(base, dtype="float32"),
        "LoRA-MoE, 7 adapters, top-2": load_model(base, root / "lora-moe", dtype="float32"),
        "FFT-MoE, 7 experts, top-2 (Mixtral)": load_model(root / "fft-moe", dtype="float32"),
    }
    prompts = torch.randint(5, 4096, (args.prompts, 48), generator=torch.Generator().manual_seed(0))
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(args.repeats):  # taking turns: a busy machine slows every contender alike
        for name, model in contenders.items():
            best[name] = min(best[name], generation_seconds(model, prompts, args.batch_size, args.new_tokens))
    tokens = args.prompts * args.new_tokens
    rates = {name: tokens / seconds for name, seconds in best.items()}
    print(f"\ngeneration: {args.prompts} prompts of 48 tokens, {args.new_tokens} new tokens each, batches of "
          f"{args.batch_size}, {torch.get_num_threads()} thread(s), best of {args.repeats}")
    base_rate = rates["base (LlamaForCausalLM)"]
    print(f"{'model':<40}{'tokens/s':>10}{'vs base':>10}")
    for name, rate in rates.items():
        print(f"{name:<40}{rate:>10.0f}{rate / base_rate:>9.2f}x")
    lora = rates["LoRA-MoE, 7 adapters, top-2"] / base_rate
    print(f"LoRA-MoE / base: {lora:.2f}x (goal >= 0.7x: {'met' if lora >= 0.7 else 'NOT met'})")
    return rates


# --- memory ----------------------------------------------------------------------------------------
def large_config(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"])


def _seeded(name: str, variant: int) -> torch.Generator:
    digest = hashlib.sha256(f"{name}:{variant}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def write_synthetic(out: Path, config: LlamaConfig, variant: int) -> int:
    """A checkpoint written tensor by tensor (never whole in memory): base values seeded by name, plus
    a small seeded change per variant (0 is the base). Returns its size in bytes."""
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    out.mkdir(parents=True)
    writer = ShardedWriter(out, [(name, torch.bfloat16, shape) for name, shape in shapes.items()], 2 * 2**30)
    for name, shape in shapes.items():
        tensor = torch.ones(shape) if name.endswith("norm.weight") else 0.02 * torch.randn(shape, generator=_seeded(name, 0))
        if variant:
            tensor += 0.002 * torch.randn(shape, generator=_seeded(name, variant))
        writer.write(name, tensor.to(torch.bfloat16))
    index = writer.close()
    config.save_pretrained(out)
    return index["metadata"]["total_size"]


PEAK = "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))"


def peak_rss(code: str) -> int:
    """Peak resident memory (bytes) of a fresh Python process running `code`, read by that process itself
    (VmHWM, which starts afresh at exec; a child's rusage would count what it inherited at fork)."""
    result = subprocess.run([sys.executable, "-c", f"{code}\n{PEAK}"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.split()[-1]) * 1024


def memory(args: argparse.Namespace, root: Path) -> None:
    config = large_config(args.mem_layers)
    size = write_synthetic(root / "base", config, 0)
    inputs = [root / f"m{i}" for i in range(1, 8)]
    for i, path in enumerate(inputs, start=1):
        write_synthetic(path, config, i)
    argv = ["mix", "--base", str(root / "base"), "--models", *map(str, inputs), "--router", "random", "--top-k", "2",
            "--out", str(root / "fft-moe")]
    mix = f"import sys\nfrom knowstack.cli import main\nif main({argv!r}) != 0: sys.exit(1)"  # `knowstack mix`
    imports = ("import knowstack.cli, knowstack.combine.moe, knowstack.combine.moe_fft, knowstack.modeling.moe_model\n"
               "import transformers.models.mixtral.modeling_mixtral")
    # Every weight read once: a loaded checkpoint may be mapped, not yet resident, until it is used.
    load_one = (f"import transformers\nmodel = transformers.AutoModelForCausalLM.from_pretrained({str(inputs[0])!r}, "
                "dtype='bfloat16')\nfor p in model.parameters(): p.abs().max()")
    start = time.perf_counter()
    build = peak_rss(mix)
    build_s = time.perf_counter() - start
    baseline, one_model = peak_rss(imports), peak_rss(load_one)
    out_size = sum(p.stat().st_size for p in (root / "fft-moe").glob("*.safetensors"))
    mb = 2**20
    print(f"\nbuilding the 7-expert FFT-MoE of {args.mem_layers}-layer bf16 Llamas ({size / mb:.0f} MB each) into "
          f"{out_size / mb:.0f} MB, in {build_s:.0f} s:")
    print(f"{'process':<46}{'peak RSS MB':>12}{'/ one input':>13}")
    for name, rss in [("knowstack mix (7 inputs, streamed)", build), ("load one input model and read its weights",
                      one_model), ("imports only (python, torch, transformers)", baseline)]:
        print(f"{name:<46}{rss / mb:>12.0f}{rss / size:>12.2f}x")
    print(f"knowstack mix above the imports: {(build - baseline) / mb:.0f} MB = {(build - baseline) / size:.2f}x one "
          f"input model (loading one model takes {(one_model - baseline) / size:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mem-layers", type=int, default=16)
    parser.add_argument("--workdir", type=Path, help="where the checkpoints go (default: a temporary dir)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="knowstack-moe-bench-", dir=args.workdir))
    try:
        if not args.skip_speed:
            speed(args, root / "speed")
        if not args.skip_memory:
            memory(args, root / "memory")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
