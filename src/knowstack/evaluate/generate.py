"""Batched greedy generation with KV cache and left padding: how every new-knowledge task is scored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    drop_finished: bool = True,
) -> list[str]:
    """Greedy continuations of `prompts` (without the prompt, special tokens dropped), in input order.

    A row stops at EOS, after `max_new_tokens`, or once its continuation contains one of
    `stop_strings`; the continuation is then cut before the stop string. A prompt longer than the model's
    context less `max_new_tokens` loses its middle. stats, when given, gets "prompts_truncated" (how many),
    "new_tokens" (every output's tokens up to and including its EOS) and what dropping finished rows saved:
    "row_tokens" (a row x a decoding step, computed) and "row_tokens_saved".
    drop_finished: once enough rows have finished, the batch goes on without them (`_generate_batch`), only down
    to sizes at which the model computes every remaining row as the whole batch would (`rows_kept_identical`), so
    the outputs are the same either way; only where that has been checked (`may_shrink`).
    """
    count = GenerationCount()
    if stats is not None:
        stats.update(prompts_truncated=0, new_tokens=0, row_tokens=0, row_tokens_saved=0)
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
        sizes = rows_kept_identical(model, len(chunk)) if drop_finished and may_shrink(model) else []
        rows = _generate_batch(model, tokenizer, input_ids.to(device), mask.to(device), max_new_tokens, pad_id,
                               stop_strings, sizes, count)
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
        for index, text in zip(chunk, texts, strict=True):
            outputs[index] = cut_at_stop(text, stop_strings)
    if stats is not None:
        stats.update(new_tokens=count.new_tokens, row_tokens=count.row_tokens, row_tokens_saved=count.row_tokens_saved)
    return outputs


ROW_LADDER = 8  # a batch shrinks to a multiple of this many rows: few sizes to check, few generate() calls


@dataclass
class GenerationCount:
    """Row-tokens generated (a row x a decoding step) and those not computed because their row had finished; the
    outputs' own tokens (up to and including each one's EOS)."""

    new_tokens: int = 0
    row_tokens: int = 0
    row_tokens_saved: int = 0


class _UntilSmaller(StoppingCriteria):
    """Wraps the stop-string criterion: remembers the rows that finished (`finished`: from the start, the rows kept
    only to fill the batch's size), and stops every row once the rows still running fit in a smaller allowed batch
    (`below`: the largest size smaller than the batch, 0 for none), so that generate() returns and the batch can
    shrink. A row stopped that way has not finished: it goes on."""

    def __init__(self, inner: StoppingCriteria | None, finished: torch.Tensor, below: int, eos: int | None):
        self.inner, self.finished, self.below, self.eos = inner, finished, below, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        if self.inner is not None:
            self.finished |= self.inner(input_ids, scores, **kwargs)
        if self.eos is not None:  # called after every token: the newest one is the only one not yet seen
            self.finished |= input_ids[:, -1] == self.eos
        if self.below and int((~self.finished).sum()) <= self.below:
            return torch.ones_like(self.finished)
        return self.finished.clone()  # a filler row, finished before this call, is not generated on


def _generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor,
                    mask: torch.Tensor, max_new_tokens: int, pad_id: int, stop_strings: Sequence[str],
                    sizes: list[int], count: GenerationCount) -> list[torch.Tensor]:
    """One left-padded batch's generated ids per row (greedy). `sizes`: the smaller row counts at which the rows
    compute as in the whole batch. generate() runs until the rows still running fit a smaller size; the batch then
    keeps those rows (and finished ones to fill the smallest size that holds them), continued from its KV cache.
    Each generate() call costs a few milliseconds of setup, so the batch shrinks at most once per allowed size."""
    width, total = input_ids.shape[1], input_ids.shape[0]
    done: list[torch.Tensor | None] = [None] * total
    alive = list(range(total))  # the batch's rows, by their index in the first batch
    cache, made, computed = None, 0, 0
    eos = tokenizer.eos_token_id
    while True:
        below = max([size for size in sizes if size < len(alive)], default=0)
        finished = torch.tensor([done[original] is not None for original in alive], device=input_ids.device)
        watch = _UntilSmaller(_StopOnStrings(tokenizer, stop_strings, width) if stop_strings else None, finished,
                              below, eos)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens - made,
                             do_sample=False, use_cache=True, pad_token_id=pad_id, eos_token_id=eos,
                             stopping_criteria=StoppingCriteriaList([watch]), cache=cache,
                             return_dict_in_generate=True)
        sequences, cache = out.sequences, out.cache
        new = sequences.shape[1] - input_ids.shape[1]
        made += new
        computed += len(alive) * new
        ended = watch.finished.clone()
        if made >= max_new_tokens or not below or int((~ended).sum()) > below:
            ended[:] = True  # the budget, or generate() stopped for the rows' own reasons: every row has finished
        for row, original in enumerate(alive):
            if bool(ended[row]) and done[original] is None:
                done[original] = sequences[row, width:]
        if all(done[original] is not None for original in alive):
            break
        running = int((~ended).sum())
        keep = _rows_to_keep(ended.tolist(), min(size for size in sizes if size >= running))
        cache.batch_select_indices(torch.tensor(keep, device=sequences.device))
        grown = torch.ones((mask.shape[0], sequences.shape[1] - mask.shape[1]), dtype=mask.dtype, device=mask.device)
        input_ids, mask = sequences[keep], torch.cat([mask, grown], dim=1)[keep]
        alive = [alive[row] for row in keep]
    count.row_tokens_saved += total * made - computed  # without dropping, the whole batch runs to its last row's end
    count.row_tokens += computed
    rows = [ids for ids in done if ids is not None]
    count.new_tokens += sum(_up_to_eos(ids.tolist(), eos) for ids in rows)
    return rows


def _up_to_eos(ids: list[int], eos: int | None) -> int:
    return ids.index(eos) + 1 if eos is not None and eos in ids else len(ids)


def _rows_to_keep(finished: list[bool], size: int) -> list[int]:
    """The rows still generating, and finished ones after them up to `size` rows, in batch order."""
    running = [row for row, ended in enumerate(finished) if not ended]
    fill = [row for row, ended in enumerate(finished) if ended][: size - len(running)]
    return sorted(running + fill)


_SIZES: dict[tuple, list[int]] = {}
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")  # config fields of token-routed MoE models


def may_shrink(model: PreTrainedModel) -> bool:
    """Whether a batch of this model may lose its finished rows: on the CPU, whose attention computes each row alone
    (checked on every family: tests/test_families_train.py), for a model that sends every token through the same
    weights. Not on a GPU until checked there: a GPU attention kernel may split its sums by how many rows it has."""
    return next(model.parameters()).device.type == "cpu" and not routes_tokens(model)


def routes_tokens(model: PreTrainedModel) -> bool:
    """Whether the model sends each token to some of its experts: an expert's matrix products then run over however
    many tokens chose it, a count that dropping rows changes, and a kernel may sum 1 to 4 rows in another order
    than 5 or more, so such a model's batch never shrinks."""
    config = model.config
    return any(isinstance(getattr(config, name, None), int) and getattr(config, name) > 1 for name in EXPERT_COUNTS)


def rows_kept_identical(model: torch.nn.Module, rows: int) -> list[int]:
    """The batch sizes below `rows` (multiples of ROW_LADDER) to which a batch of `rows` can shrink with every row's
    numbers unchanged: checked on each shape and dtype of the model's matrices (its linear layers', and any other 2-D
    weight multiplied by the rows, e.g. a LoRA-MoE's stacked LoRA pairs: the sums whose order a kernel may choose by
    the number of rows; on some CPU kernels 1 to 4 rows sum in another order than 5 or more), with the model's own
    weights, each size against the whole batch, bit for bit, once per process. A size is allowed only with every
    larger one allowed."""
    weights: dict[tuple, torch.Tensor] = {}
    for weight in model.parameters():
        if weight.dim() == 2:
            weights.setdefault((tuple(weight.shape), weight.dtype), weight.detach())
    key = (tuple(sorted(weights, key=str)), next(model.parameters()).device, rows)
    if key not in _SIZES:
        _SIZES[key] = _identical_sizes(list(weights.values()), rows)
    return _SIZES[key]


def _identical_sizes(weights: list[torch.Tensor], rows: int) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    allowed: list[int] = []
    for size in sorted(range(ROW_LADDER, rows, ROW_LADDER), reverse=True):
        for weight in weights:
            x = torch.randn(rows, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
            whole = torch.nn.functional.linear(x, weight)
            picked = torch.randperm(rows, generator=generator)[:size].sort().values.to(weight.device)
            if not torch.equal(torch.nn.functional.linear(x[picked], weight), whole[picked]):
                return sorted(allowed)
        allowed.append(size)
    return sorted(allowed)
