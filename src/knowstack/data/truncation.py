"""Fitting an overlong prompt into a token budget by cutting its middle, the one way training and evaluation do it.

A task's prompt usually opens with the instruction and ends with the question and the answer cue, while the
bulk (a meeting transcript, a code file) sits between: cutting the middle keeps both ends. This is what the
paper's collator does (RhuiDih/cl, do_finetuning.py, DataCollatorFlat2: `tok1[:n1//2] + tok1[-(n1-n1//2):]`,
the first half of the budget from the start and the rest from the end), where right truncation would cut
the answer away and left truncation the instruction.

Two rules fit a whole training example (`training.overlong`): knowstack's own, `keep-answer` (data/batches.py: the
answer is never cut, the prompt gives way), and the paper's collator's, `paper` (`fit_as_the_paper`), which also
cuts an answer longer than half the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def truncate_middle(ids: Sequence[T], budget: int, *, keep_first: int = 0) -> list[T]:
    """`ids` cut to at most `budget` items by dropping its middle: budget // 2 from the start, the rest from the
    end. keep_first: leading items (a BOS token) that are always kept, within the budget (when the budget is
    smaller than them, only the first `budget` of them remain)."""
    ids = list(ids)
    if budget < 0:
        raise ValueError(f"the budget must not be negative, got {budget}")
    if len(ids) <= budget:
        return ids
    head, body = ids[:keep_first], ids[keep_first:]
    room = budget - len(head)
    if room <= 0:
        return head[:budget]
    start = room // 2
    # body[-0:] would be all of it: an explicit end index avoids that edge
    return head + body[:start] + body[len(body) - (room - start):]


def fit_as_the_paper(context: Sequence[T], target: Sequence[T], window: int) -> tuple[list[T], list[T]]:
    """(context, target) of an example cut as the paper's collator cuts one longer than `window` tokens (RhuiDih/cl
    do_finetuning.py, DataCollatorFlat2, L146-155); context: the prompt's ids as the tokenizer gives them (its BOS
    first, if it adds one), target: the answer's ids then eos. An example that fits is returned as is.

    - A target of at most window // 2 tokens is kept whole; the context keeps window - len(target) tokens, its
      middle cut (truncate_middle: half, rounded down, from the start, the rest from the end; the BOS is an
      ordinary first token here).
    - A longer target: the context's share is n1 = int(len(context) / total * window), computed in floats as the
      paper's code does (rounded toward zero); the target keeps its first window - n1 tokens (its eos is lost),
      the context n1 tokens, its middle cut as above. Where n1 is 0 the paper's `tok1[-(n1 - n1//2):]` is
      `tok1[-0:]`, the whole context: the example then stays longer than the window, as it did in the paper.
    """
    context, target = list(context), list(target)
    total = len(context) + len(target)
    if total <= window:
        return context, target
    if len(target) <= window // 2:
        return truncate_middle(context, window - len(target)), target
    share = int(len(context) / total * window)
    kept_context = context if share == 0 else truncate_middle(context, share)
    return kept_context, target[: window - share]
