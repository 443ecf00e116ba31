"""Memory estimates (study/resources.py) against the real models: exact parameter, gradient and optimizer
bytes; activations against the tensors autograd saves; the peak resident memory of a training run
within a stated factor; and the dry run's table for the paper config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_tokenizer
from test_plan import paper_config_with_data
from transformers import AutoConfig

from knowstack.builtin.pretrain import ModelShape, make_model
from knowstack.cli import main
from knowstack.config import LLAMA_LINEAR, load_config, parse_config
from knowstack.data.batches import collate, tokenize_examples
from knowstack.data.formats import Example
from knowstack.modeling.loss import answer_loss_sum
from knowstack.study.plan import build_plan
from knowstack.study.resources import (
    FALLBACK_CONFIGS,
    GiB,
    _from_hf_config,
    architecture_of,
    estimate_plan,
    train_estimate,
)
from knowstack.train.loop import _make_optimizer, _use_segment_attention
from knowstack.train.settings import TrainSettings

SHAPE = ModelShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=344, context=256)
TEXT = "The official currency of Japan is the yen. France is in Europe. " * 20
LENGTH, MICRO = 128, 4
# Measured on this model: the activation estimate is within 10% of what autograd saves (it counts
# every packed row as full, as here); the peak resident memory of a whole train() call (allocator
# slack, backward's transient gradients, checkpoint writing) is 1.3x (FFT) to 2.0x (LoRA) the estimate.
ACTIVATION_TOLERANCE = 0.25
PEAK_FACTOR = (0.75, 2.5)


def _config(finetune_dropout: float = 0.0, micro: int = MICRO, length: int = LENGTH):
    return parse_config({"name": "m", "base": {"builtin": "test"}, "training": {
        "lr": 1e-4, "batch_size": micro, "micro_batch_size": micro, "max_length": length,
        "lora": {"r": 8, "alpha": 16, "dropout": finetune_dropout}}})


def _model(finetune: str):
    model = make_model(build_tiny_tokenizer(), SHAPE, 0)
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=list(LLAMA_LINEAR), task_type="CAUSAL_LM"))
    return model.requires_grad_(True)


def _full_batch() -> dict[str, torch.Tensor]:
    tokenizer = build_tiny_tokenizer()
    # Overlong prompts: each row is cut to LENGTH in the middle of its prompt, its answer kept whole.
    examples = [Example(f"Q{i}: " + TEXT[:600], " A: " + TEXT[:100]) for i in range(MICRO)]
    tokenized = tokenize_examples(tokenizer, examples, LENGTH)
    assert len(tokenized) == MICRO and all(len(ex) == LENGTH for ex in tokenized)  # every row full, as the estimate assumes
    return collate(tokenized, pack_rows=True, pad_token_id=tokenizer.pad_token_id)


def test_parameter_counts_are_the_models() -> None:
    model = make_model(build_tiny_tokenizer(), SHAPE, 0)
    arch = _from_hf_config(model.config)
    assert arch.params == sum(p.numel() for p in model.parameters())
    lora = _model("lora")
    assert arch.lora_params(8, list(LLAMA_LINEAR)) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    # Llama-3-8B's published parameter count, from the fallback table's config
    assert _from_hf_config(AutoConfig.for_model(**FALLBACK_CONFIGS["meta-llama/Meta-Llama-3-8B"])).params == 8_030_261_248


@pytest.mark.parametrize("finetune", ["fft", "lora"])
def test_weights_gradients_and_optimizer_state_are_exact(finetune: str) -> None:
    model = _model(finetune)
    optimizer = _make_optimizer(model, TrainSettings(finetune=finetune))
    answer_loss_sum(model.train(), _full_batch()).backward()
    optimizer.step()
    measured = {
        "weights": sum(p.nbytes for p in model.parameters()),
        "grads": sum(p.grad.nbytes for p in model.parameters() if p.grad is not None),
        "optimizer": sum(t.nbytes for state in optimizer.state.values() for t in state.values() if t.dim() > 0),
    }
    arch = _from_hf_config(_model("fft").config)
    estimate = train_estimate(arch, _config(), finetune)
    assert measured == {"weights": estimate.weights, "grads": estimate.grads, "optimizer": estimate.optimizer}


def saved_activation_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """The bytes autograd keeps for the backward of one training forward (the loop's packed attention), parameters
    not counted."""
    _use_segment_attention(model)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        answer_loss_sum(model.train(), batch)
    return sum(saved.values())


@pytest.mark.parametrize("finetune", ["fft", "lora"])
def test_activation_estimate_matches_what_autograd_saves(finetune: str) -> None:
    measured = saved_activation_bytes(_model(finetune), _full_batch())
    arch = _from_hf_config(_model("fft").config)
    estimate = train_estimate(arch, _config(), finetune).activations
    print(f"{finetune}: activations saved {measured / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB")
    assert abs(measured - estimate) <= ACTIVATION_TOLERANCE * measured


# each run is a fresh process (~10 s): LoRA's runs with the slow checks
@pytest.mark.parametrize("finetune", ["fft", pytest.param("lora", marks=pytest.mark.slow)])
def test_peak_memory_of_a_training_run_is_within_a_factor_of_the_estimate(finetune: str, tmp_path: Path) -> None:
    script = Path(__file__).parent / "peak_memory.py"
    env = {**os.environ, "PYTHONPATH": str(script.parent), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), finetune, str(tmp_path)], env=env, check=True,
                            capture_output=True, text=True)
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = numbers["measured"] / numbers["estimate"]
    print(f"{finetune}: peak +{numbers['measured'] / 2**20:.0f} MiB, estimated {numbers['estimate'] / 2**20:.0f} MiB "
          f"(x{ratio:.2f})")
    assert PEAK_FACTOR[0] <= ratio <= PEAK_FACTOR[1]


def _paper_with_moe(tmp_path: Path) -> Path:
    path = paper_config_with_data(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["methods"]["moe"] = {"experts": ["fft", "lora"], "top_k": 2}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_paper_config_dry_run_prints_memory_and_gpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _paper_with_moe(tmp_path)
    assert main(["study", str(path), "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    printed = " ".join(capsys.readouterr().err.split())
    assert "not in the Hugging Face cache" in printed and "fallback table" in printed
    for text in ("train FFT", "train LoRA", "eval FFT-MoE", "eval LoRA-MoE", "merge-adapter", "as launched"):
        assert text in printed
    assert "do not fit as launched" not in printed  # the paper config's launch section fits 80 GB GPUs

    estimates = {(step.label, est.what): est for step, est in estimate_plan(build_plan(load_config(path)))[0]}
    fft = estimates[("fft-cstance", "train FFT")]
    lora = estimates[("lora-cstance", "train LoRA")]
    # the paper config trains bf16 weights (training.precision): 2 bytes each, as their gradients and moments
    assert fft.weights == fft.grads == 2 * 8_030_261_248 and fft.optimizer == 2 * fft.weights
    assert fft.gpus > 1 and lora.gpus == 1  # 8B FFT needs sharding, its LoRA fits one GPU
    moe_fft = next(e for (_, what), e in estimates.items() if what == "eval FFT-MoE")
    moe_lora = next(e for (_, what), e in estimates.items() if what == "eval LoRA-MoE")
    assert moe_fft.params > 5 * 8e9 and moe_fft.gpus > 1 and moe_lora.gpus == 1
    assert all(est.gpus == 0 for (_, what), est in estimates.items() if what in ("merge", "merge-adapter"))
    assert main(["study", str(path), "--out", str(tmp_path / "run"), "--dry-run", "--gpu-memory", "40"]) == 0
    assert "GPUs of 40 GiB" in " ".join(capsys.readouterr().err.split())


def test_architecture_from_a_local_config_then_the_table_then_nothing(tiny_model_dir: Path) -> None:
    base = {"name": "x", "tasks": [{"name": "t", "path": "t", "metric": "accuracy"}],
            "old_knowledge": {"tasks": ["piqa"]}, "training": {"lr": 1e-5}}
    arch, source = architecture_of(parse_config({**base, "base": {"model": str(tiny_model_dir)}}))
    assert "its config.json" in source and arch.params == sum(
        p.numel() for p in make_model(build_tiny_tokenizer(), ModelShape(hidden=64, layers=2, heads=4, kv_heads=2,
                                                                          intermediate=128, context=256), 0).parameters())
    arch, source = architecture_of(parse_config({**base, "base": {"model": "meta-llama/Meta-Llama-3-8B"}}))
    assert arch.params == 8_030_261_248 and arch.source == "fallback table" and "fallback table" in source
    arch, source = architecture_of(parse_config({**base, "base": {"model": "someone/unknown-model"}}))
    assert arch is None and "not in the fallback table" in source


def test_builtin_world_estimates_are_small_and_per_step() -> None:
    config = parse_config({"name": "b", "base": {"builtin": "test"}, "training": {"lr_of_pretrain_peak": 0.1},
                           "methods": {"one-round": {"finetune": ["fft", "lora"]}}})
    estimates, source = estimate_plan(build_plan(config))
    assert "built-in preset 'test'" in source
    kinds = {step.kind for step, _ in estimates}
    assert kinds == {"world", "train", "eval"}
    assert all(est.total < GiB for _, est in estimates)
    assert next(est for step, est in estimates if step.kind == "world").gpus == 0
