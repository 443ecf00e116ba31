"""Fitting an overlong prompt into a token budget by cutting its middle, the one way training and evaluation do it.

A task's prompt usually opens with the instruction and ends with the question and the answer cue, while the
bulk (a meeting transcript, a code file) sits between: cutting the middle keeps both ends. This is what the
paper's collator does (RhuiDih/cl, do_finetuning.py, DataCollatorFlat2: `tok1[:n1//2] + tok1[-(n1-n1//2):]`,
the first half of the budget from the start and the rest from the end), where right truncation would cut
the answer away and left truncation the instruction.
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
