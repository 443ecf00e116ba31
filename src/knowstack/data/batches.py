"""From Examples to model inputs: answer-only labels, packing without cross-contamination, batch order.

An example becomes  [bos?] + prompt + answer + eos.  Prompt and answer are tokenized separately and
their ids concatenated, so the boundary is exactly where evaluation puts it (the prompt tokenized
alone, the answer generated after it), and the loss covers the answer and eos only.

Packing follows transformers' DataCollatorWithFlattening: a micro-batch's examples are laid end to
end in one row with position_ids restarting at 0 for each example and no attention_mask. Given
that, transformers (checked in 5.23: masking_utils.find_packed_sequence_indices) builds a
block-diagonal causal mask, so no example attends to another; tests/test_train.py checks that the
packed loss equals the per-example one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from knowstack.data.formats import Example
from knowstack.data.truncation import fit_as_the_paper, truncate_middle

IGNORE = -100
PACKED_TOKENS = 2048  # tokens per forward pass when reading hidden states or router logits (no training)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE on the prompt (and bos), the token id on answer + eos

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def answer_tokens(self) -> int:
        """Tokens the loss is taken on (a label at position 0 is never predicted)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    # Tokenizers differ (Llama-3 adds bos through its post-processor, many add nothing): ask the
    # tokenizer what it does by default rather than trusting a flag that not every class has.
    if tokenizer.bos_token_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int,
    *,
    counts: dict[str, int] | None = None,
    overlong: str = "keep-answer",
) -> list[TokenizedExample]:
    """Answer-only-labelled token ids for each example that fits in max_length, in order.

    overlong (`training.overlong`): keep-answer: an overlong example keeps its answer, the middle of its prompt is
    cut (data/truncation.py, as the paper's collator does); one whose answer + eos (+ bos) leaves no room for a
    single prompt token is dropped: it could only teach an answer to no question. paper: the paper's collator's
    rule (truncation.fit_as_the_paper), which drops nothing and cuts an answer longer than half the window.
    counts, when given, gets "truncated" (the prompt cut, the answer whole), "answer_cut" (the answer cut too) and
    "dropped" (how many of each).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; training needs one to end answers")
    prefix = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    eos = [tokenizer.eos_token_id]
    prompts = tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([ex.answer for ex in examples], add_special_tokens=False)["input_ids"]
    out = []
    truncated = dropped = 0
    if overlong == "paper":
        out, truncated, answer_cut = _fit_as_the_paper(prompts, answers, prefix, eos, max_length)
        if counts is not None:
            counts.update(truncated=truncated, answer_cut=answer_cut, dropped=0)
        return out
    for prompt_ids, answer_ids in zip(prompts, answers, strict=True):
        target = list(answer_ids) + eos
        room = max_length - len(prefix) - len(target)  # what is left of the window for the prompt
        if room < 1:
            dropped += 1
            continue
        if len(prompt_ids) > room:
            truncated += 1
            prompt_ids = truncate_middle(prompt_ids, room)
        context = prefix + list(prompt_ids)
        out.append(TokenizedExample(tuple(context + target), tuple([IGNORE] * len(context) + target)))
    if counts is not None:
        counts.update(truncated=truncated, answer_cut=0, dropped=dropped)
    return out


def _fit_as_the_paper(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], prefix: list[int],
                      eos: list[int], max_length: int) -> tuple[list[TokenizedExample], int, int]:
    """The examples cut by the paper's rule, with how many lost part of their prompt only and how many part of
    their answer."""
    out = []
    truncated = answer_cut = 0
    for prompt_ids, answer_ids in zip(prompts, answers, strict=True):
        target = list(answer_ids) + eos
        context, kept = fit_as_the_paper(prefix + list(prompt_ids), target, max_length)
        answer_cut += len(kept) < len(target)
        truncated += len(kept) == len(target) and len(context) < len(prefix) + len(prompt_ids)
        out.append(TokenizedExample(tuple(context + kept), tuple([IGNORE] * len(context) + kept)))
    return out, truncated, answer_cut


def pack(examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
    """One row holding all examples, positions restarting per example (no attention_mask on purpose)."""
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        input_ids += ex.input_ids
        # The first token of an example is never a target: in the flat row it would be "predicted"
        # from the previous example's last token.
        labels += [IGNORE, *ex.labels[1:]]
        positions += range(len(ex))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
    }


def pad(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows with an attention mask: the unpacked layout."""
    width = max(len(ex) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate(examples: Sequence[TokenizedExample], *, pack_rows: bool, pad_token_id: int) -> dict[str, torch.Tensor]:
    return pack(examples) if pack_rows else pad(examples, pad_token_id)


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of positions whose next token is a target, those targets): the causal shift, done once.

    The mask is passed to the model as logits_to_keep, so the vocabulary projection runs only where a
    loss is taken: on the answer, not on prompts or padding.
    """
    following = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = following != IGNORE
    return keep, following[following != IGNORE]


def total_examples(n_examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """How many examples a run draws: epochs x the data, or max_steps full batches."""
    if max_steps is not None:
        return max_steps * batch_size
    return max(1, round(epochs * n_examples))


def count_steps(n_examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """ceil(epochs * n / batch_size) optimizer steps, unless max_steps is set."""
    if max_steps is not None:
        return max_steps
    return math.ceil(total_examples(n_examples, batch_size, epochs, None) / batch_size)


def batch_order(
    n_examples: int, batch_size: int, epochs: float, max_steps: int | None, seed: int
) -> list[list[int]]:
    """Example indices of each optimizer step: a fresh seeded shuffle per epoch, read end to end.

    The same (n, settings, seed) always gives the same order, on every process; the last batch is
    smaller when epochs * n is not a multiple of batch_size (as a DataLoader without drop_last).
    """
    if n_examples <= 0:
        raise ValueError("no training examples")
    wanted = total_examples(n_examples, batch_size, epochs, max_steps)
    order: list[int] = []
    epoch = 0
    while len(order) < wanted:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order += torch.randperm(n_examples, generator=generator).tolist()
        epoch += 1
    order = order[:wanted]
    return [order[start : start + batch_size] for start in range(0, wanted, batch_size)]


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This process's share of one effective batch (strided, so shares differ by at most one)."""
    return list(batch[rank::world_size])


def micro_batches(indices: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    return [list(indices[i : i + micro_batch_size]) for i in range(0, len(indices), micro_batch_size)]


def packed_rows(token_lists: Sequence[Sequence[int]], max_tokens: int = PACKED_TOKENS
                ) -> list[tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]]:
    """Sequences laid end to end in rows of about max_tokens (position ids restart per sequence, so
    no sequence attends to another): (input_ids, position_ids, [start, end) of each sequence)."""
    rows, ids, positions, bounds = [], [], [], []
    for tokens in token_lists:
        if ids and len(ids) + len(tokens) > max_tokens:
            rows.append((ids, positions, bounds))
            ids, positions, bounds = [], [], []
        bounds.append((len(ids), len(ids) + len(tokens)))
        ids = ids + list(tokens)
        positions = positions + list(range(len(tokens)))
    if ids:
        rows.append((ids, positions, bounds))
    return [(torch.tensor([i]), torch.tensor([p]), b) for i, p, b in rows]
