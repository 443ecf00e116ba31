"""GPU scale check: knowstack at real model sizes next to its peers, on random-initialised models (no download).

Built from their public config.json (tests/fixtures/configs/ when present, else the copies in CONFIGS below), on
the GPU:
- training steps of Llama-3.2-1B (FFT) and Llama-3-8B (LoRA) on packed TRACE-shaped batches (prompts of a few
  hundred tokens, short answers) through knowstack's own loop (train/loop.py run_steps: the steps train() runs,
  in float32 master weights under bf16 autocast, as `accelerate launch --mixed_precision bf16` runs them), side by
  side with HF Trainer + PEFT on the same examples (benchmarks/train_throughput.py's recipe: padded batches and
  padding-free DataCollatorWithFlattening, the stronger of the two is the peer), same weights precision, same
  micro-batch size. Tokens per second of the steps after `--warmup` (real tokens, no padding), model FLOPs
  utilisation against the device's dense bf16 peak (FFT: 6 x parameters per token; LoRA: 4 x parameters + 6 x
  adapter parameters per token, forward 2N and backward 2N for the input gradients, no weight gradients of the
  frozen base), and peak GPU memory (torch's max_memory_allocated) against the dry run's estimate
  (study/resources.py train_estimate, on the paper config with this run's settings: as the dry run computes it,
  every row max_length tokens; and at the longest packed row this run had);
- greedy generation of the 8B in bf16: knowstack's batched generation (evaluate/generate.py) against plain HF
  `generate` in the same batches, at the paper protocol's budget (evaluate/protocols.py), same prompts;
- a merge of three 8B checkpoints (bf16, sharded like the hub's, written from the GPU): `knowstack merge --method
  average`, and mergekit's `linear` beside it where mergekit is installed. The inputs go to /dev/shm (RAM) when it
  holds them, else to disk; where neither holds three full checkpoints and the output, the checkpoints keep fewer
  layers (the JSON says which variant ran).

It prints each ratio and writes one JSON file (`--json`), section by section, so a run cut short keeps what it
measured; `scripts/docs_numbers.py --scale FILE` turns it into the docs' `scale` block. Where a figure needs a GPU
(MFU, peak GPU memory), a run on the CPU says "not measured (no GPU)". `--tiny` runs all of it on the CPU with
2-layer models of a few MB in well under a minute (tests/test_scale_check.py); without `--tiny` it needs a GPU.

    python benchmarks/scale_check.py --json scale-check.json            # on a GPU machine: scripts/scale-check.sh
    python benchmarks/scale_check.py --tiny --json /tmp/scale.json      # the same code, tiny, on the CPU
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from knowstack.data.batches import batch_order, tokenize_examples
from knowstack.evaluate.generate import generate
from knowstack.evaluate.protocols import scorings
from knowstack.progress import set_sink
from knowstack.train.loop import make_trainable, run_steps
from knowstack.train.settings import TrainSettings
from knowstack.usage import peak_gpu_bytes, reset_peak_gpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import mergekit_config, shapes, timed, write_checkpoint  # noqa: E402
from train_throughput import (  # noqa: E402
    PEERS,
    _corpus,
    build_tokenizer,
    features_of,
    make_examples,
    make_trainer,
    peer_collator,
)

ROOT = Path(__file__).resolve().parents[1]
NOT_MEASURED = "not measured (no GPU)"
GiB = 2**30
# The published config.json values that build each model (huggingface.co/meta-llama/<name>/blob/main/config.json);
# tests/fixtures/configs/<dir>/config.json, where present, is read instead.
CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-3.2-1B": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
        "initializer_range": 0.02},
    "Llama-3-8B": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
        "initializer_range": 0.02},
}
FIXTURE_DIRS = {"Llama-3.2-1B": "llama-3.2-1b", "Llama-3-8B": "llama-3-8b"}
# --tiny: the same configs (tied embeddings, RoPE scaling and all) at 2 layers and a few MB
TINY_SHAPE = {"vocab_size": 8192, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by what torch.cuda.get_device_name contains; first match wins
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))
PAPER_CONFIG = ROOT / "src" / "knowstack" / "configs" / "paper" / "llama3-8b-trace.yaml"


@dataclass(frozen=True)
class Preset:
    """Sizes and step counts: the GPU's defaults, or --tiny's."""

    batch: int
    fft_micro: int
    lora_micro: int
    max_length: int
    warmup: int
    steps: int
    prompt_words: tuple[int, int]
    answer_words: tuple[int, int]
    tokens: tuple[int, int]
    gen_prompts: int
    gen_batch: int
    gen_budget: int | None  # None: the paper protocol's
    merge_models: int


# GPU: the paper's effective batch per GPU (16) and max_length (2048); a micro-batch that an H100 holds for the
# stronger peer too (the 8B's padded peer at 8 would not fit); TRACE-like lengths: prompts of ~90-600 tokens
# (C-STANCE, FOMC, ScienceQA, Py150's context), answers of 2-45 (a letter up to a short summary)
GPU = Preset(batch=16, fft_micro=16, lora_micro=4, max_length=2048, warmup=2, steps=6, prompt_words=(60, 400),
             answer_words=(1, 30), tokens=(64, 768), gen_prompts=32, gen_batch=32, gen_budget=None, merge_models=3)
TINY = Preset(batch=4, fft_micro=4, lora_micro=2, max_length=128, warmup=1, steps=1, prompt_words=(10, 50),
              answer_words=(1, 8), tokens=(16, 100), gen_prompts=4, gen_batch=2, gen_budget=4, merge_models=3)


# --- the machine ----------------------------------------------------------------------------------------------------
def device_info() -> dict[str, Any]:
    """What ran it: the device and its bf16 peak, and the library versions."""
    import accelerate
    import peft
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__, "accelerate": accelerate.__version__,
                            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        info.update(name=name, cuda=True, memory_gib=torch.cuda.get_device_properties(0).total_memory / GiB,
                    peak_bf16_tflops=bf16_peak(name))
    else:
        info.update(name=f"CPU ({platform.processor() or platform.machine()})", cuda=False,
                    memory_gib=NOT_MEASURED, peak_bf16_tflops=NOT_MEASURED)
    return info


def bf16_peak(device_name: str) -> float | str:
    """The dense bf16 peak (TFLOP/s) of a GPU by its name, or a sentence saying it is not known here."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), f"unknown for {device_name}")


def model_fields(name: str, tiny: bool, tokenizer: PreTrainedTokenizerFast) -> tuple[dict[str, Any], str]:
    """The model's config.json fields (the fixture's where there is one) and where they came from; --tiny shrinks
    the dims and keeps the rest. Special token ids are the tokenizer's (the model's own tokenizer is not here)."""
    fixture = ROOT / "tests" / "fixtures" / "configs" / FIXTURE_DIRS[name] / "config.json"
    if fixture.is_file():
        fields, source = json.loads(fixture.read_text()), str(fixture.relative_to(ROOT))
    else:
        fields, source = dict(CONFIGS[name]), "benchmarks/scale_check.py CONFIGS"
    fields = {k: v for k, v in fields.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
    if tiny:
        fields.update(TINY_SHAPE)
        source += " (tiny: 2 layers, hidden 64)"
    fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return fields, source


def build_model(fields: dict[str, Any], dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """A random-initialised model built from its config right on `device` (HF's own init, seeded)."""
    config = LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def release() -> None:
    """Free what a finished measurement held (its objects deleted, the accelerator's references dropped)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- training ---------------------------------------------------------------------------------------------------
def flops_per_token(finetune: str, params: int, trainable: int) -> tuple[float, str]:
    """Model FLOPs per trained token (params: the base model's; trainable: what is trained) and the formula's words."""
    if finetune == "fft":
        return 6.0 * params, "6 x parameters per token (forward 2N, backward 4N)"
    return 4.0 * params + 6.0 * trainable, ("4 x parameters + 6 x adapter parameters per token (forward 2N, backward "
                                            "2N for the input gradients; the frozen base gets no weight gradients)")


def throughput(tokens: int, seconds: float, flops: float, peak: Any) -> dict[str, Any]:
    """tokens/s and model FLOPs utilisation (a share of the device's dense bf16 peak)."""
    tps = tokens / seconds if seconds > 0 else None
    if not isinstance(peak, float) or tps is None:
        mfu: Any = peak if isinstance(peak, str) else None
    else:
        mfu = tps * flops / (peak * 1e12)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tps, "mfu": mfu}


def peak_memory() -> Any:
    peak = peak_gpu_bytes()
    return peak / GiB if peak is not None else NOT_MEASURED


class QuietBar:
    """The training loop's progress bar, silent: the check prints one line per run (a log, not a terminal)."""

    def __init__(self, iterable: Any, desc: str) -> None:
        self.iterable = iterable

    def __iter__(self) -> Any:
        return iter(self.iterable)

    def set_postfix(self, **values: Any) -> None:
        pass


class StepClock(TrainerCallback):
    """The Trainer peer's step ends (the device awaited) and the real tokens of each micro-batch its collator made,
    in order: the tokens of steps k..m are exactly those of micro-batches k*A..m*A (A = accumulation steps)."""

    def __init__(self, collator: Callable) -> None:
        self.collator, self.micro_tokens, self.ends = collator, [], []

    def __call__(self, features: list[dict]) -> Any:
        self.micro_tokens.append(sum(len(f["input_ids"]) for f in features))
        return self.collator(features)

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        cuda_sync()
        self.ends = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs) -> None:
        cuda_sync()
        self.ends.append(time.perf_counter())


@dataclass
class TrainCase:
    label: str  # "Llama-3.2-1B FFT"
    model: str
    finetune: str
    micro: int


def run_knowstack_steps(case: TrainCase, fields: dict, tokenized: list, preset: Preset, accelerator: Any,
                        settings: TrainSettings, device: str, pad_token_id: int) -> tuple[dict, dict]:
    """knowstack's loop on the case's model: (timing of the steps after warmup, run facts)."""
    model = make_trainable(build_model(fields, torch.float32, device), settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = sum(p.numel() for p in model.parameters()) - (trainable if case.finetune == "lora" else 0)
    plan = batch_order(len(tokenized), settings.batch_size, 1.0, preset.warmup + preset.steps, settings.seed)
    reset_peak_gpu()
    try:
        model, record = run_steps(accelerator, model, tokenized, plan, settings, pad_token_id,
                                  progress_desc=f"knowstack {case.label}")
        memory = peak_memory()
    finally:
        accelerator.free_memory()  # its references to the model and optimizer, even after a failure
    del model
    release()
    tokens = sum(len(tokenized[i]) for batch in plan[preset.warmup:] for i in batch)
    rows = [sum(len(tokenized[i]) for i in batch[j:j + settings.micro_batch_size])
            for batch in plan for j in range(0, len(batch), settings.micro_batch_size)]
    seconds = sum(record["step_seconds"][preset.warmup:])
    return ({"tokens": tokens, "seconds": seconds, "step_seconds": record["step_seconds"],
             "peak_gpu_memory_gib": memory},
            {"params": params, "trainable": trainable, "longest_row": max(rows), "final_loss": record["losses"][-1]})


def run_peer(case: TrainCase, fields: dict, features: list, tokenizer: PreTrainedTokenizerFast, preset: Preset,
             settings: TrainSettings, device: str, collator_kind: str, out: Path, weights: torch.dtype) -> dict:
    """HF Trainer (+ PEFT for LoRA) on the same examples, steps and micro-batch size."""
    model = make_trainable(build_model(fields, weights, device), settings)
    clock = StepClock(peer_collator(collator_kind, tokenizer))
    trainer = make_trainer(model, features, tokenizer, settings, case.micro, out, collator_kind,
                           max_steps=preset.warmup + preset.steps, gpu=device == "cuda", collator=clock,
                           callbacks=[clock], tolerance=flattening_tolerance(device, weights))
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line
    reset_peak_gpu()
    try:
        trainer.train()
        memory = peak_memory()
    finally:
        trainer.accelerator.free_memory()
    accumulation = max(1, settings.batch_size // case.micro)
    first, last = preset.warmup * accumulation, (preset.warmup + preset.steps) * accumulation
    step_seconds = [b - a for a, b in zip(clock.ends[:-1], clock.ends[1:], strict=True)]
    result = {"tokens": sum(clock.micro_tokens[first:last]), "seconds": sum(step_seconds[preset.warmup:]),
              "step_seconds": step_seconds, "peak_gpu_memory_gib": memory}
    del trainer, model
    release()
    return result


def flattening_tolerance(device: str, weights: torch.dtype) -> float:
    """How far the flattening peer's packed logits may be from the per-example ones: a GPU's attention kernels differ
    between the two layouts, more so in bf16 (logits of these random models are ~1 wide; packed examples that saw
    each other would be off by about that much)."""
    if device != "cuda":
        return 1e-4
    return 1e-2 if weights == torch.float32 else 1e-1


def dry_run_estimate(fields: dict, finetune: str, settings: TrainSettings, longest_row: int, work: Path) -> dict:
    """The dry run's memory estimate of this step (study/resources.py on the paper config, with this run's batch,
    micro-batch, max_length and LoRA settings and a dir holding only the model's config.json): as the dry run
    computes it (every row micro x max_length tokens), and with the rows this run really had (its longest)."""
    from knowstack.config import load_config
    from knowstack.study.resources import architecture_of, train_estimate

    config_dir = work / f"config-{finetune}"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.json").write_text(json.dumps({**fields, "architectures": ["LlamaForCausalLM"]}))
    paper = load_config(PAPER_CONFIG)
    lora = paper.training.lora.model_copy(update={"r": settings.lora_r, "alpha": settings.lora_alpha,
                                                  "dropout": settings.lora_dropout})

    def estimate(micro: int, max_length: int) -> Any:
        training = paper.training.model_copy(update={"batch_size": settings.batch_size, "micro_batch_size": micro,
                                                     "max_length": max_length, "lora": lora})
        config = paper.model_copy(update={"base": paper.base.model_copy(update={"model": str(config_dir)}),
                                          "training": training})
        arch, _ = architecture_of(config)
        if arch is None:
            raise RuntimeError(f"the dry run found no architecture in {config_dir}")
        return train_estimate(arch, config, finetune)

    as_planned = estimate(settings.micro_batch_size, settings.max_length)
    at_rows = estimate(1, longest_row)
    return {"gib": as_planned.total / GiB, "gpus": as_planned.gpus,
            "parts_gib": {part: getattr(as_planned, part) / GiB
                          for part in ("weights", "grads", "optimizer", "activations")},
            "tokens_per_row": settings.micro_batch_size * settings.max_length,
            "at_longest_row_gib": at_rows.total / GiB, "longest_row_tokens": longest_row,
            "params": as_planned.params}


def train_case(case: TrainCase, tokenizer: PreTrainedTokenizerFast, examples: list, preset: Preset, args: Any,
               accelerator: Any, work: Path, peak: Any) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fields, source = model_fields(case.model, args.tiny, tokenizer)
    settings = TrainSettings(finetune=case.finetune, batch_size=preset.batch, micro_batch_size=case.micro,
                             max_length=preset.max_length)
    tokenized = tokenize_examples(tokenizer, examples, settings.max_length)
    features = features_of(tokenized)
    result: dict[str, Any] = {"name": case.label, "model": case.model, "config": source, "finetune": case.finetune,
                              "micro": case.micro, "batch": settings.batch_size, "max_length": settings.max_length,
                              "warmup_steps": preset.warmup, "timed_steps": preset.steps,
                              "weights": "float32 master weights, bf16 autocast" if device == "cuda" else "float32"}
    print(f"\n{case.label}: {preset.warmup} + {preset.steps} steps of {settings.batch_size} examples, micro-batch "
          f"{case.micro}, on {device}", flush=True)
    ours, facts = attempt(lambda: run_knowstack_steps(case, fields, tokenized, preset, accelerator, settings,
                                                      device, tokenizer.pad_token_id), "knowstack")
    if facts is None:
        result["knowstack"] = ours
        return result
    flops, formula = flops_per_token(case.finetune, facts["params"], facts["trainable"])
    result.update(params=facts["params"], trainable=facts["trainable"], flops_per_token=flops, flops_formula=formula,
                  longest_row_tokens=facts["longest_row"])
    result["knowstack"] = {**throughput(ours["tokens"], ours["seconds"], flops, peak), **ours}
    report_line("knowstack", result["knowstack"])
    peers: dict[str, Any] = {}
    variants = [(kind, kind, torch.float32) for kind in PEERS]
    if case.finetune == "lora" and device == "cuda" and not args.no_bf16_base_peer:
        # what many PEFT users run: the frozen base in bf16 (half the memory); informational, not the ratio's peer
        variants.append(("flattening, bf16 base", "flattening", torch.bfloat16))
    for label, kind, weights in variants:
        run, _ = attempt(lambda kind=kind, weights=weights, label=label: (
            run_peer(case, fields, features, tokenizer, preset, settings, device, kind,
                     work / f"trainer-{case.finetune}-{label.replace(', ', '-').replace(' ', '-')}", weights), None),
            f"Trainer {label}")
        if "tokens" in run:
            run = {**throughput(run["tokens"], run["seconds"], flops, peak), **run}
            report_line(f"Trainer {label}", run)
        peers[label] = run
    result["peers"] = peers
    scored = {kind: peers[kind]["tokens_per_second"] for kind in PEERS if peers[kind].get("tokens_per_second")}
    if scored and result["knowstack"].get("tokens_per_second"):
        stronger = max(scored, key=scored.get)
        result["stronger_peer"] = stronger
        result["ratio_vs_stronger_peer"] = result["knowstack"]["tokens_per_second"] / scored[stronger]
        print(f"  knowstack / Trainer {stronger}: {result['ratio_vs_stronger_peer']:.2f}x tokens per second")
    estimate, _ = attempt(lambda: (dry_run_estimate(fields, case.finetune, settings, facts["longest_row"], work),
                                   None), "dry-run estimate")
    measured = result["knowstack"].get("peak_gpu_memory_gib")
    if isinstance(measured, float) and "gib" in estimate:
        estimate["measured_over_estimate"] = measured / estimate["gib"]
        estimate["measured_over_estimate_at_longest_row"] = measured / estimate["at_longest_row_gib"]
        print(f"  peak GPU memory {measured:.1f} GiB; dry-run estimate {estimate['gib']:.1f} GiB "
              f"({estimate['measured_over_estimate']:.2f}x), {estimate['at_longest_row_gib']:.1f} GiB at the longest "
              f"row of {facts['longest_row']} tokens ({estimate['measured_over_estimate_at_longest_row']:.2f}x)")
    result["estimate"] = estimate
    return result


def report_line(name: str, run: dict) -> None:
    mfu = run["mfu"]
    mfu_text = f"MFU {mfu:.1%}" if isinstance(mfu, float) else f"MFU {mfu}"
    memory = run["peak_gpu_memory_gib"]
    memory_text = f"{memory:.1f} GiB" if isinstance(memory, float) else memory
    print(f"  {name:30} {run['tokens_per_second']:10.0f} tokens/s  {mfu_text}  peak {memory_text}", flush=True)


def attempt(measure: Callable[[], tuple[Any, Any]], what: str) -> tuple[dict, Any]:
    """A measurement that fails (out of memory, say) is recorded as its error, and the check goes on."""
    try:
        return measure()
    except Exception as err:  # noqa: BLE001 - one failure must not cost the rest of a GPU session
        message = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    # outside the except block: the traceback (and the tensors its frames hold) is gone by now
    print(f"  {what}: FAILED ({message})", flush=True)
    release()
    return {"error": message}, None


# --- generation -------------------------------------------------------------------------------------------------
def generated_tokens(rows: torch.Tensor, eos: int | None) -> int:
    """New tokens of each row up to and including its first eos (a finished row's padding is not counted)."""
    total = 0
    for row in rows.tolist():
        total += row.index(eos) + 1 if eos is not None and eos in row else len(row)
    return total


def hf_generate(model: Any, tokenizer: PreTrainedTokenizerFast, prompts: list[str], budget: int,
                batch: int) -> tuple[list[str], int, dict]:
    """Plain HF generate: batches in input order, left-padded by the tokenizer, greedy."""
    device = next(model.parameters()).device
    texts, tokens = [], 0
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch):
        encoded = tokenizer(prompts[start:start + batch], return_tensors="pt", padding=True).to(device)
        out = model.generate(**encoded, max_new_tokens=budget, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        new = out[:, encoded["input_ids"].shape[1]:]
        tokens += generated_tokens(new, tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts, tokens, {}


def knowstack_generate(model: Any, tokenizer: PreTrainedTokenizerFast, prompts: list[str], budget: int,
                       batch: int) -> tuple[list[str], int, dict]:
    """evaluate/generate.py's generate, the new tokens it reports (each output up to and including its EOS), and the
    row-tokens it computed and saved by dropping finished rows."""
    stats: dict = {}
    texts = generate(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch, stats=stats)
    return texts, stats["new_tokens"], {key: stats[key] for key in ("row_tokens", "row_tokens_saved")}


def generation_check(tokenizer: PreTrainedTokenizerFast, corpus: list[str], preset: Preset, args: Any) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fields, source = model_fields(args.gen_model, args.tiny, tokenizer)
    paper_budget = scorings("paper", "rouge_l")[0].max_new_tokens
    budget = args.gen_budget or preset.gen_budget or paper_budget
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    examples = make_examples(corpus, tokenizer, preset.gen_prompts, seed=1, prompt_words=preset.prompt_words,
                             answer_words=preset.answer_words, tokens=preset.tokens)
    prompts = [ex.prompt for ex in examples]
    print(f"\ngeneration: {args.gen_model} in {dtype}, {len(prompts)} prompts in batches of {args.gen_batch}, "
          f"{budget} new tokens (the paper protocol's budget is {paper_budget})", flush=True)
    model = build_model(fields, dtype, device).eval()
    result: dict[str, Any] = {"model": args.gen_model, "config": source, "dtype": str(dtype).removeprefix("torch."),
                              "prompts": len(prompts), "batch": args.gen_batch, "max_new_tokens": budget,
                              "paper_budget": paper_budget,
                              "budget_source": "evaluate/protocols.py, protocol 'paper' (TRACE's --max_ans_len)"}
    sides = {"knowstack": knowstack_generate, "hf_generate": hf_generate}
    outputs = {}
    for name, run in sides.items():
        run(model, tokenizer, prompts[:args.gen_batch], min(4, budget), args.gen_batch)  # warm-up: kernels, cache
        cuda_sync()
        start = time.perf_counter()
        texts, tokens, rows = run(model, tokenizer, prompts, budget, args.gen_batch)
        cuda_sync()
        seconds = time.perf_counter() - start
        outputs[name] = texts
        result[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds, **rows}
        print(f"  {name:12} {tokens / seconds:10.0f} new tokens/s ({tokens} tokens in {seconds:.1f} s)", flush=True)
    result["ratio"] = result["knowstack"]["tokens_per_second"] / result["hf_generate"]["tokens_per_second"]
    result["same_outputs"] = sum(a == b for a, b in zip(outputs["knowstack"], outputs["hf_generate"], strict=True))
    print(f"  knowstack / HF generate: {result['ratio']:.2f}x; {result['same_outputs']} of {len(prompts)} outputs "
          "identical", flush=True)
    del model
    release()
    return result


# --- merge ------------------------------------------------------------------------------------------------------
def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def merge_layout(layers: int, checkpoint: Callable[[int], int], models: int, places: Sequence[Path], disk: Path, *,
                 free: Callable[[Path], int] = free_bytes,
                 same: Callable[[Path, Path], bool] = same_filesystem) -> tuple[int, Path, Path]:
    """(layers, inputs dir, output dir): the first of `places` that holds `models` checkpoints of all `layers`, the
    output on `disk` (or beside the inputs where the disk has no room); where none does, the most layers that fit."""
    for kept in range(layers, 0, -1):
        size = int(checkpoint(kept) * 1.05)
        for inputs in places:
            taken = models * size if same(inputs, disk) else 0
            if free(inputs) >= models * size and free(disk) - taken >= size:
                return kept, inputs, disk
            if free(inputs) >= (models + 1) * size:
                return kept, inputs, inputs
    raise RuntimeError(f"not even one layer of {models} checkpoints fits in {' or '.join(map(str, places))}")


def mergekit_command() -> list[str] | None:
    """mergekit's command line where it is importable here (it is not a knowstack dependency)."""
    if importlib.util.find_spec("mergekit") is None:
        return None
    return [sys.executable, "-c", "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())"]


def merge_check(tokenizer: PreTrainedTokenizerFast, preset: Preset, args: Any, work: Path) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fields, source = model_fields(args.merge_model, args.tiny, tokenizer)
    layers = fields["num_hidden_layers"]

    def config_of(kept: int) -> LlamaConfig:
        return LlamaConfig(**{**{k: v for k, v in fields.items() if k != "model_type"}, "num_hidden_layers": kept,
                              "dtype": "bfloat16", "architectures": ["LlamaForCausalLM"]})

    def checkpoint_bytes(kept: int) -> int:
        return 2 * sum(torch.Size(s).numel() for s in shapes(config_of(kept)).values())

    models = args.merge_models or preset.merge_models
    disk = work / "merge-disk"
    disk.mkdir(parents=True, exist_ok=True)
    shm = Path(args.merge_shm)
    scratch = Path(tempfile.mkdtemp(prefix="knowstack-scale-", dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) \
        else None
    places = [args.merge_inputs] if args.merge_inputs else [p for p in (scratch, disk) if p is not None]
    try:
        kept, inputs_dir, out_dir = merge_layout(layers, checkpoint_bytes, models, places, disk)
        where = f"RAM ({shm})" if inputs_dir == scratch else f"{inputs_dir} (disk)"
        variant = (f"full size, inputs in {where}" if kept == layers else
                   f"lighter: {kept} of {layers} layers (the full size does not fit), inputs in {where}")
        config = config_of(kept)
        tensor_shapes = shapes(config)
        print(f"\nmerge: {models} x {args.merge_model} ({variant}), bf16, written from {device}", flush=True)
        start = time.perf_counter()
        inputs = []
        for i in range(models):
            path = inputs_dir / f"input-{i}"
            write_checkpoint(path, config, tensor_shapes, seed=i + 1, base_seed=0, shard_bytes=5 * GiB,
                             dtype=torch.bfloat16, device=device)
            tokenizer.save_pretrained(path)
            inputs.append(path)
        size = sum(f.stat().st_size for f in inputs[0].glob("*.safetensors"))
        print(f"  inputs written in {time.perf_counter() - start:.0f} s: {size / 1e9:.2f} GB each", flush=True)
        result: dict[str, Any] = {"method": "average", "models": models, "model": args.merge_model, "config": source,
                                  "layers": kept, "of_layers": layers, "variant": variant,
                                  "params": sum(torch.Size(s).numel() for s in tensor_shapes.values()),
                                  "checkpoint_gb": size / 1e9, "inputs_on": str(inputs_dir), "output_on": str(out_dir),
                                  "dtype": "bfloat16"}
        out = out_dir / "merged"
        ours = [sys.executable, "-m", "knowstack.cli", "merge", "--method", "average",
                "--models", *map(str, inputs), "--out", str(out)]
        result["knowstack"] = run_merge(ours, inputs, out, size)
        mergekit = mergekit_command()
        if mergekit is None:
            result["mergekit"] = "not installed"
        else:
            recipe = work / "mergekit-average.yml"
            recipe.write_text(mergekit_config("average", inputs[0], inputs, dtype="float32", out_dtype="bfloat16"))
            command = [*mergekit, str(recipe), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
            result["mergekit"] = run_merge(command, inputs, out, size)
        if isinstance(result["mergekit"], dict) and "wall_s" in result["mergekit"] and "wall_s" in result["knowstack"]:
            result["ratio_vs_mergekit"] = result["knowstack"]["wall_s"] / result["mergekit"]["wall_s"]
            print(f"  knowstack / mergekit: {result['ratio_vs_mergekit']:.2f}x wall time", flush=True)
        return result
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


def run_merge(command: list[str], inputs: list[Path], out: Path, checkpoint: int) -> dict[str, Any]:
    """One timed merge process (wall, CPU, peak RSS per input checkpoint); its output deleted after."""
    name = "knowstack" if "knowstack.cli" in command else "mergekit"
    try:
        run = timed(command, inputs)
    except SystemExit as failed:  # timed() exits with the process's stderr
        message = " ".join(str(failed).split())[-300:]
        print(f"  {name}: FAILED ({message})", flush=True)
        return {"error": message}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"  {name:10} {run.wall_s:6.1f} s wall, {run.cpu_s:6.1f} s CPU, peak RSS "
          f"{run.peak_rss / checkpoint:.2f} checkpoints", flush=True)
    return {"wall_s": run.wall_s, "cpu_s": run.cpu_s, "peak_rss_per_checkpoint": run.peak_rss / checkpoint}


# --- the run ----------------------------------------------------------------------------------------------------
def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer models of a few MB on the CPU (a check that "
                                                            "the script runs, not a measurement)")
    parser.add_argument("--json", type=Path, help="write the figures here (rewritten after each part)")
    parser.add_argument("--parts", default="train,generate,merge", help="which parts run (comma-separated)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per run (GPU default 6)")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps first (GPU default 2)")
    parser.add_argument("--batch", type=int, help="examples per optimizer step (GPU default 16)")
    parser.add_argument("--fft-micro", type=int, help="micro-batch of the 1B FFT, every side (GPU default 16)")
    parser.add_argument("--lora-micro", type=int, help="micro-batch of the 8B LoRA, every side (GPU default 4)")
    parser.add_argument("--max-length", type=int, help="tokens per example at most (GPU default 2048, the paper's)")
    parser.add_argument("--no-bf16-base-peer", action="store_true",
                        help="skip the extra LoRA peer that holds the frozen base in bf16")
    parser.add_argument("--gen-model", default="Llama-3-8B", choices=sorted(CONFIGS))
    parser.add_argument("--gen-prompts", type=int, help="prompts generated from (GPU default 32)")
    parser.add_argument("--gen-batch", type=int, help="prompts per generate call (GPU default 32, knowstack's)")
    parser.add_argument("--gen-budget", type=int, help="new tokens per prompt (default: the paper protocol's)")
    parser.add_argument("--merge-model", default="Llama-3-8B", choices=sorted(CONFIGS))
    parser.add_argument("--merge-models", type=int, help="checkpoints merged (default 3)")
    parser.add_argument("--merge-shm", default="/dev/shm", help="RAM-backed dir for the inputs when they fit there")
    parser.add_argument("--merge-inputs", type=Path, help="put the inputs here instead (a disk, say)")
    parser.add_argument("--workdir", type=Path, help="scratch space on disk (default: a temporary dir)")
    args = parser.parse_args(argv)
    preset = TINY if args.tiny else GPU
    overrides = {"steps": args.steps, "warmup": args.warmup, "batch": args.batch, "fft_micro": args.fft_micro,
                 "lora_micro": args.lora_micro, "max_length": args.max_length}
    args.preset = Preset(**{**preset.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    args.gen_prompts = args.gen_prompts or args.preset.gen_prompts
    args.gen_batch = args.gen_batch or args.preset.gen_batch
    args.part_names = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.part_names) - {"train", "generate", "merge"}
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))} (train, generate, merge)")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here: the scale check needs a GPU (--tiny runs its code on the CPU)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset = args.preset
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")  # the libraries' deprecation notes, not the check's business
    set_sink(QuietBar)
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    report: dict[str, Any] = {
        "benchmark": "scale_check", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["scale_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "preset": "tiny" if args.tiny else "gpu", "commit": git_commit(), "device": device_info(),
        "data": {}, "train": [], "generation": None, "merge": None, "seconds": None}
    peak = report["device"]["peak_bf16_tflops"]
    print(f"scale check on {report['device']['name']} (bf16 peak {peak}); torch {torch.__version__}, transformers "
          f"{report['device']['transformers']}, peft {report['device']['peft']}", flush=True)
    started = time.perf_counter()

    def save() -> None:
        report["seconds"] = time.perf_counter() - started
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    corpus = _corpus()
    tokenizer = build_tokenizer(corpus)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="knowstack-scale-check-"))
    try:
        if "train" in args.part_names:
            n = preset.batch * (preset.warmup + preset.steps)
            examples = make_examples(corpus, tokenizer, n, prompt_words=preset.prompt_words,
                                     answer_words=preset.answer_words, tokens=preset.tokens)
            tokenized = tokenize_examples(tokenizer, examples, preset.max_length)
            prompts = sorted(len(ex) - ex.answer_tokens for ex in tokenized)
            answers = sorted(ex.answer_tokens for ex in tokenized)
            report["data"] = {"examples": len(examples), "tokens": sum(len(ex) for ex in tokenized),
                              "prompt_tokens": [prompts[0], statistics.median(prompts), prompts[-1]],
                              "answer_tokens": [answers[0], statistics.median(answers), answers[-1]],
                              "shape": "TRACE-like: a few hundred tokens of prompt, a short answer; text cut from "
                                       "Python's docstrings, BPE vocabulary 4096"}
            print(f"data: {len(examples)} examples, prompts {prompts[0]}-{prompts[-1]} tokens (median "
                  f"{statistics.median(prompts):.0f}), answers {answers[0]}-{answers[-1]}", flush=True)
            for case in (TrainCase("Llama-3.2-1B FFT", "Llama-3.2-1B", "fft", preset.fft_micro),
                         TrainCase("Llama-3-8B LoRA", "Llama-3-8B", "lora", preset.lora_micro)):
                result, _ = attempt(lambda case=case: (train_case(case, tokenizer, examples, preset, args, accelerator,
                                                                  work, peak), None), case.label)
                report["train"].append(result if "name" in result else {"name": case.label, **result})
                save()
        if "generate" in args.part_names:
            report["generation"], _ = attempt(lambda: (generation_check(tokenizer, corpus, preset, args), None),
                                              "generation")
            save()
        if "merge" in args.part_names:
            report["merge"], _ = attempt(lambda: (merge_check(tokenizer, preset, args, work), None), "merge")
            save()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    save()
    print(f"\ndone in {report['seconds']:.0f} s" + (f"; wrote {args.json}" if args.json else ""), flush=True)
    return report


if __name__ == "__main__":
    main()
