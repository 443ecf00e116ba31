"""Pretraining the built-in base: a small Llama learns the corpus by next-token prediction."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from knowstack.progress import step_bar


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 688
    context: int = 512


@dataclass(frozen=True)
class PretrainSettings:
    steps: int
    batch_size: int = 16
    # Short windows: the facts are sentences, and more optimizer steps per token teach them faster.
    sequence_length: int = 128
    peak_lr: float = 3e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1


def model_config(shape: ModelShape, vocab_size: int, **token_ids: int | None) -> LlamaConfig:
    """The built-in base's transformers config: a Llama of `shape` (study/resources.py counts its parameters from
    it before the world is built). token_ids: bos_token_id, eos_token_id, pad_token_id."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.context,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        **token_ids,
    )


def make_model(tokenizer: PreTrainedTokenizerFast, shape: ModelShape, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = model_config(shape, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def token_stream(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> torch.Tensor:
    """All documents as one stream, each as bos + text + eos."""
    ids: list[int] = []
    for encoded in tokenizer(documents)["input_ids"]:
        ids += encoded + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def _lr_at(step: int, settings: PretrainSettings) -> float:
    if step < settings.warmup_steps:
        return settings.peak_lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    floor = settings.final_lr_fraction
    return settings.peak_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def pretraining_optimizer(model: LlamaForCausalLM, settings: PretrainSettings) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=settings.peak_lr, betas=(0.9, 0.95),
                             weight_decay=settings.weight_decay)


def pretraining_step(model: LlamaForCausalLM, batch: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One optimizer step of next-token prediction on `batch` (clipped to norm 1); returns the loss."""
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def pretrain(model: LlamaForCausalLM, stream: torch.Tensor, settings: PretrainSettings, seed: int) -> dict:
    """Trains on random windows of the stream (seeded); returns the loss curve and token count."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = pretraining_optimizer(model, settings)
    length = settings.sequence_length
    starts = list(range(0, len(stream) - length - 1, length))
    model.train()
    losses: list[float] = []
    bar = step_bar(range(settings.steps), "pretrain base", unit="step")
    order: list[int] = []
    for step in bar:
        if len(order) < settings.batch_size:
            order = starts[:]
            rng.shuffle(order)
        batch = torch.stack([stream[s : s + length] for s in (order.pop() for _ in range(settings.batch_size))])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings)
        loss = pretraining_step(model, batch, optimizer)
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return {"loss_curve": losses, "tokens": settings.steps * settings.batch_size * length}
