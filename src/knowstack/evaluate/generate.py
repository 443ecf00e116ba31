"""Batched greedy generation with KV cache and left padding: how every new-knowledge task is scored."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _encode(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt: int) -> list[list[int]]:
    # Same ids as training sees (the tokenizer's default special tokens); overlong prompts keep their end.
    encoded = tokenizer(list(prompts))["input_ids"]
    return [ids[-max_prompt:] if len(ids) > max_prompt else ids for ids in encoded]


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return input_ids, mask


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy continuations of `prompts` (without the prompt, special tokens dropped), in input order."""
    if not prompts:
        return []
    limit = getattr(model.config, "max_position_embeddings", 4096)
    encoded = _encode(tokenizer, prompts, max(1, limit - max_new_tokens))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Sorting by length keeps each batch's padding small; results go back to input order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, mask = _left_pad([encoded[i] for i in chunk], pad_id)
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(generated[:, input_ids.shape[1]:], skip_special_tokens=True)
        for index, text in zip(chunk, texts, strict=True):
            outputs[index] = text
    return outputs
