"""O-LoRA: the penalty against a direct computation, gradients only to the current A, A_prev on disk."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.modelio import load_model
from knowstack.train import TrainSettings, train
from knowstack.train.olora import (
    OLoraPenalty,
    adapter_a_matrices,
    load_previous,
    module_key,
    orthogonality_penalty,
    save_previous,
    stack_previous,
    trainable_a_matrices,
)

TARGETS = ["q_proj", "down_proj"]


def direct_penalty(current: torch.Tensor, previous: torch.Tensor) -> float:
    """sum_jk |sum_m A_t[j, m] A_prev[k, m]|, one element at a time."""
    total = 0.0
    for j, k in itertools.product(range(current.shape[0]), range(previous.shape[0])):
        total += abs(sum(float(current[j, m]) * float(previous[k, m]) for m in range(current.shape[1])))
    return total


def peft_model(model_dir: Path, seed: int, r: int = 2):
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(load_model(model_dir, dtype=torch.float32), config)


def test_penalty_equals_the_direct_computation() -> None:
    current = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    round1 = torch.tensor([[2.0, 1.0, 0.0], [-1.0, 0.0, 4.0]])
    round2 = torch.tensor([[0.5, 0.5, 0.5]])
    previous = torch.cat([round1, round2])
    # Worked by hand: each row of A_t against each of the 3 earlier rows, |dot product|, summed.
    by_hand = (abs(2 - 2 + 0) + abs(-1 + 0 + 2) + abs(0.5 - 1 + 0.25)) + (abs(3) + abs(-4) + abs(1.5 - 0.5))
    assert by_hand == 9.25
    assert direct_penalty(current, previous) == pytest.approx(by_hand)
    assert float(orthogonality_penalty([(current, previous)])) == pytest.approx(by_hand)
    # Summed over modules, and over earlier rounds = against their row-concatenation.
    other = torch.randn(4, 5), torch.randn(6, 5)
    total = orthogonality_penalty([(current, previous), other])
    assert float(total) == pytest.approx(by_hand + direct_penalty(*other), rel=1e-5)
    split = orthogonality_penalty([(current, round1), (current, round2)])
    assert float(split) == pytest.approx(by_hand)


def test_penalty_on_a_peft_model_and_gradients_only_to_current_a(tiny_model_dir: Path) -> None:
    model = peft_model(tiny_model_dir, seed=1)
    current = trainable_a_matrices(model)
    assert len(current) == 2 * 2  # 2 layers x (q_proj, down_proj)
    previous = {key: torch.randn(6, a.shape[1]) for key, a in current.items()}
    penalty = OLoraPenalty(previous, lam=0.5)
    value = penalty(model)
    expected = sum(direct_penalty(a.detach(), previous[key]) for key, a in current.items())
    assert float(value.detach()) == pytest.approx(0.5 * expected, rel=1e-5)
    assert penalty.values == pytest.approx([expected], rel=1e-5)

    value.backward()
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name  # lora_B and the frozen base get nothing from the penalty
    assert all(not t.requires_grad and t.grad is None for t in penalty.previous.values())


def test_earlier_rounds_a_matrices_round_trip_as_safetensors(tiny_model_dir: Path, tmp_path: Path) -> None:
    live = {}
    for round_ in (1, 2):
        model = peft_model(tiny_model_dir, seed=round_)
        model.save_pretrained(tmp_path / f"round{round_}", safe_serialization=True)
        live[round_] = {k: v.detach().clone() for k, v in trainable_a_matrices(model).items()}
    saved = adapter_a_matrices(tmp_path / "round1")
    assert saved.keys() == live[1].keys()  # saved and live names map to the same module keys
    assert module_key("base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight") == \
        "model.layers.0.mlp.down_proj"
    previous = stack_previous([tmp_path / "round1", tmp_path / "round2"])
    for key, stacked in previous.items():
        assert stacked.shape == (4, live[1][key].shape[1])
        torch.testing.assert_close(stacked, torch.cat([live[1][key], live[2][key]]))
    save_previous(tmp_path / "prev.safetensors", previous)
    loaded = load_previous(tmp_path / "prev.safetensors")
    assert loaded.keys() == previous.keys() and all(torch.equal(loaded[k], previous[k]) for k in loaded)
    assert not list(tmp_path.glob(".*tmp*"))


def test_mismatched_modules_are_a_clear_error(tiny_model_dir: Path) -> None:
    model = peft_model(tiny_model_dir, seed=0)
    with pytest.raises(KnowstackError, match="target_modules"):
        OLoraPenalty({"model.layers.0.self_attn.v_proj": torch.randn(2, 64)}, lam=1.0)(model)
    with pytest.raises(KnowstackError, match="negative"):
        OLoraPenalty({"x": torch.randn(2, 64)}, lam=-1.0)


def test_training_with_the_penalty_logs_it_per_step_and_pushes_it_down(tiny_model_dir: Path, tmp_path: Path) -> None:
    examples = [Example(f"What is {i} plus {i}? Answer:", f" {2 * i}") for i in range(16)]
    earlier = peft_model(tiny_model_dir, seed=7, r=8)
    previous = {k: v.detach().clone() for k, v in trainable_a_matrices(earlier).items()}
    settings = TrainSettings(finetune="lora", lr=1e-2, max_steps=4, batch_size=8, micro_batch_size=8,
                             max_length=32, lora_r=8, lora_dropout=0.0, target_modules=tuple(TARGETS))
    penalty = OLoraPenalty(previous, lam=5.0)
    summary = train(tiny_model_dir, examples, tmp_path / "olora", settings, extra_loss=penalty)
    assert len(penalty.values) == 4
    assert summary["extra_loss_curve"] == pytest.approx([5.0 * v for v in penalty.values], rel=1e-5)
    assert penalty.values[-1] < penalty.values[0]
    record = penalty.record()
    assert record["lambda"] == 5.0 and record["modules"] == 4 and record["previous_rows"] == 8
