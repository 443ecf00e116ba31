"""Batched greedy generation with KV cache and left padding: how every new-knowledge task is scored."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from knowstack.config import EVAL_BATCH_SIZE
from knowstack.data.truncation import truncate_middle


def _encode(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt: int) -> tuple[list[list[int]], int]:
    # Same ids as training sees (the tokenizer's default special tokens); an overlong prompt loses its middle,
    # as in training (data/truncation.py), keeping its start (the instruction, and its BOS if the tokenizer adds
    # one) and its end (the question and the answer cue). Returns the ids and how many prompts were cut.
    encoded = tokenizer(list(prompts))["input_ids"]
    bos = tokenizer.bos_token_id
    fitted = [truncate_middle(ids, max_prompt, keep_first=int(bos is not None and ids[:1] == [bos])) for ids in encoded]
    return fitted, sum(len(ids) > max_prompt for ids in encoded)


class _StopOnStrings(StoppingCriteria):
    """Marks a row finished once its generated text (never the prompt) contains a stop string.

    Only a window at the end is decoded each step: a stop string that ends with the newest token
    lies within it (4 tokens per character covers byte-level pieces of any UTF-8 character).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop_strings, self.prompt_width = tokenizer, tuple(stop_strings), prompt_width
        self.window = 4 * max(len(s) for s in stop_strings) + 4

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_width :]
        texts = self.tokenizer.batch_decode(new[:, -self.window :], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stop_strings: Sequence[str] | None) -> str:
    """The text before the earliest stop string (the stop string itself is dropped)."""
    if not stop_strings:
        return text
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[: min(cuts)] if cuts else text


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
    batch_size: int = EVAL_BATCH_SIZE,
    stop_strings: Sequence[str] | None = None,
    stats: dict | None = None,
) -> list[str]:
    """Greedy continuations of `prompts` (without the prompt, special tokens dropped), in input order.

    A row stops at EOS, after `max_new_tokens`, or once its continuation contains one of
    `stop_strings`; the continuation is then cut before the stop string. A prompt longer than the model's
    context less `max_new_tokens` loses its middle; stats, when given, gets "prompts_truncated" (how many).
    """
    if stats is not None:
        stats["prompts_truncated"] = 0
    if not prompts:
        return []
    stop_strings = [s for s in stop_strings or () if s]
    limit = getattr(model.config, "max_position_embeddings", 4096)
    encoded, truncated = _encode(tokenizer, prompts, max(1, limit - max_new_tokens))
    if stats is not None:
        stats["prompts_truncated"] = truncated
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Sorting by length keeps each batch's padding small; results go back to input order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, mask = _left_pad([encoded[i] for i in chunk], pad_id)
        criteria = [_StopOnStrings(tokenizer, stop_strings, input_ids.shape[1])] if stop_strings else []
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList(criteria),
        )
        texts = tokenizer.batch_decode(generated[:, input_ids.shape[1]:], skip_special_tokens=True)
        for index, text in zip(chunk, texts, strict=True):
            outputs[index] = cut_at_stop(text, stop_strings)
    return outputs
