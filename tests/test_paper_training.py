"""The paper's training, as its script ran it: the loss of HF Trainer up to transformers 4.45 (the mean of each
micro-batch's token mean, `loss_reduction: micro_batch`) and bfloat16 weights without mixed precision
(`precision: bf16`), against transformers' own loss as the oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import EXAMPLES, _weights

from knowstack.data.batches import batch_order, collate, micro_batches, tokenize_examples
from knowstack.modelio import load_model, load_tokenizer
from knowstack.train import TrainSettings, train

STEP = {"finetune": "fft", "lr": 1e-3, "batch_size": 8, "micro_batch_size": 2, "max_steps": 1, "max_length": 64,
        "max_grad_norm": 1e6}  # no clipping: the gradients compared are the loss's own


def _gradients_at_the_step(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """The trainable parameters (name -> gradient, and dtype) each time AdamW steps."""
    seen: list[dict[str, torch.Tensor]] = []
    step = torch.optim.AdamW.step

    def recording(optimizer: torch.optim.Optimizer, *args, **kwargs):
        seen.append([(p.grad.clone(), p.dtype) for group in optimizer.param_groups for p in group["params"]
                     if p.grad is not None])
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    return seen


def _trainer_up_to_4_45(model_dir: Path, settings: TrainSettings) -> tuple[float, list[torch.Tensor]]:
    """HF Trainer's first step before 4.46: each micro-batch's loss is the model's own (a mean over its answer
    tokens, padded, labels shifted by transformers), divided by the number of micro-batches, and backpropagated."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    tokenized = tokenize_examples(tokenizer, EXAMPLES, settings.max_length)
    batch = batch_order(len(tokenized), settings.batch_size, settings.epochs, settings.max_steps, settings.seed)[0]
    micros = micro_batches(batch, settings.micro_batch_size)
    total = 0.0
    for micro in micros:
        inputs = collate([tokenized[i] for i in micro], pack_rows=False, pad_token_id=tokenizer.pad_token_id)
        loss = model(**inputs, use_cache=False).loss / len(micros)
        loss.backward()
        total += float(loss)
    params = list(model.parameters())  # in AdamW's groups' order: decayed (matrices), then not (biases, norms)
    return total, [p.grad for p in params if p.ndim >= 2] + [p.grad for p in params if p.ndim < 2]


@pytest.mark.parametrize("pack", [True, False])
def test_micro_batch_loss_is_trainer_up_to_4_45(pack: bool, tiny_model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _gradients_at_the_step(monkeypatch)
    settings = TrainSettings(loss_reduction="micro_batch", pack=pack, **STEP)
    summary = train(tiny_model_dir, EXAMPLES, tmp_path / "micro", settings)
    loss, gradients = _trainer_up_to_4_45(tiny_model_dir, settings)
    assert summary["loss_curve"][0] == pytest.approx(loss, rel=1e-5)
    ours = [grad for grad, _ in seen[0]]
    assert len(ours) == len(gradients)
    for mine, oracle in zip(ours, gradients, strict=True):
        torch.testing.assert_close(mine, oracle, rtol=1e-4, atol=1e-6)


def test_the_two_reductions_weigh_examples_differently(tiny_model_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _gradients_at_the_step(monkeypatch)
    runs = {reduction: train(tiny_model_dir, EXAMPLES, tmp_path / reduction,
                             TrainSettings(loss_reduction=reduction, **STEP))
            for reduction in ("token", "micro_batch")}
    assert runs["token"]["loss_curve"][0] != pytest.approx(runs["micro_batch"]["loss_curve"][0], rel=1e-5)
    token, micro = ([grad for grad, _ in step] for step in seen)
    assert max(float((a - b).abs().max()) for a, b in zip(token, micro, strict=True)) > 1e-4


@pytest.mark.parametrize("finetune", ["fft", "lora"])
def test_bf16_precision_trains_bf16_weights(finetune: str, tiny_model_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _gradients_at_the_step(monkeypatch)
    settings = TrainSettings(**{**STEP, "finetune": finetune, "max_steps": 2, "precision": "bf16"})
    train(tiny_model_dir, EXAMPLES, tmp_path / "bf16", settings)
    dtypes = {dtype for step in seen for _, dtype in step}
    # FFT: every weight and so AdamW's state in bfloat16. LoRA: the frozen base in bfloat16; PEFT keeps the
    # adapter's own weights in float32 (its autocast_adapter_dtype default).
    assert dtypes == ({torch.bfloat16} if finetune == "fft" else {torch.float32})
    if finetune == "fft":  # saved in the base's dtype (float32 here): values bfloat16 holds exactly
        for name, weight in _weights(tmp_path / "bf16").items():
            assert torch.equal(weight.to(torch.bfloat16).to(weight.dtype), weight), name
    else:
        base = load_model(tiny_model_dir, dtype=torch.bfloat16)
        assert next(base.parameters()).dtype == torch.bfloat16
