"""Which training examples a fully-cooperative round draws: joint training and replay.

Pure functions of (task sizes, settings, seed): the same inputs always give the same draw, so a
round's data is reproducible and can be recorded next to the model it trained.

A draw of k examples from a task of n is `k // n` full copies of the task plus `k % n` distinct
examples chosen at random: without replacement when the task is at least as large as the sample,
upsampled (every example repeated as evenly as possible) when it is smaller. The paper's code
(MixtureDataset, DuplicateDataset) upsamples the same way, by copies of the smaller set. A replay
sample is drawn once per round (the paper's code redraws it each epoch; the same for one epoch).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

SAMPLINGS = ("uniform", "proportional")


@dataclass(frozen=True)
class Draw:
    """k examples from a task of `size`: `copies` full passes plus the `extra` indices (sorted)."""

    size: int
    copies: int
    extra: tuple[int, ...]

    @property
    def count(self) -> int:
        return self.copies * self.size + len(self.extra)

    def indices(self) -> list[int]:
        return list(range(self.size)) * self.copies + list(self.extra)

    def to_dict(self) -> dict[str, object]:
        # Compact on purpose: a joint draw of a large task is mostly whole copies.
        return {"size": self.size, "count": self.count, "copies": self.copies, "extra": list(self.extra)}


def derive_seed(seed: int, *parts: str) -> int:
    """A seed for one purpose (e.g. the replay of one round), stable across runs and platforms."""
    text = "|".join([str(seed), *parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def draw(size: int, count: int, rng: random.Random) -> Draw:
    if size <= 0:
        raise ValueError("cannot draw from an empty task")
    if count < 0:
        raise ValueError("count must not be negative")
    copies, rest = divmod(count, size)
    return Draw(size, copies, tuple(sorted(rng.sample(range(size), rest))))


def replay_count(current_size: int, fraction: float) -> int:
    """fraction x |current task|, rounded half up (not Python's round-half-even)."""
    return int(fraction * current_size + 0.5)


def replay_sample(current_size: int, earlier_sizes: Sequence[int], fraction: float, seed: int) -> list[Draw]:
    """One round of replay: from every earlier task, fraction x |current task| examples.

    The current task itself is used whole and is not part of the return value.
    """
    if fraction <= 0:
        raise ValueError("fraction must be positive")
    count = replay_count(current_size, fraction)
    rng = random.Random(seed)
    return [draw(size, count, rng) for size in earlier_sizes]


def joint_sample(sizes: Sequence[int], sampling: str, seed: int) -> list[Draw]:
    """All tasks at once. uniform: every task upsampled to the largest one's size, so each task is
    drawn equally often (the paper's joint training); proportional: every task once, as it is."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}")
    if not sizes:
        raise ValueError("joint training needs at least one task")
    if sampling == "proportional":
        return [Draw(size, 1, ()) for size in sizes]
    rng = random.Random(seed)
    target = max(sizes)
    return [draw(size, target, rng) for size in sizes]


def mixed(named: Sequence[tuple[str, Sequence[T]]], draws: Sequence[Draw], record: dict[str, Any]) -> tuple[list[T], dict]:
    """The examples the draws pick from each named task, and `record` completed with what was drawn from which
    task (index by index), to be kept beside the model it trains."""
    examples = [data[i] for (_, data), d in zip(named, draws, strict=True) for i in d.indices()]
    sources = [{"task": name, **d.to_dict()} for (name, _), d in zip(named, draws, strict=True)]
    return examples, {**record, "examples": len(examples), "sources": sources}


def replay_mixture(current: tuple[str, Sequence[T]], earlier: Sequence[tuple[str, Sequence[T]]], fraction: float,
                   seed: int) -> tuple[list[T], dict]:
    """One replay round: the current task whole, plus fraction x its size from each earlier task."""
    round_seed = derive_seed(seed, "replay", current[0])
    draws = [Draw(len(current[1]), 1, ()), *replay_sample(len(current[1]), [len(d) for _, d in earlier], fraction,
                                                          round_seed)]
    return mixed([current, *earlier], draws, {"kind": "replay", "fraction": fraction, "seed": round_seed})


def joint_mixture(tasks: Sequence[tuple[str, Sequence[T]]], sampling: str, seed: int) -> tuple[list[T], dict]:
    """All tasks at once, drawn by `sampling`."""
    joint_seed = derive_seed(seed, "joint", *(name for name, _ in tasks))
    draws = joint_sample([len(d) for _, d in tasks], sampling, joint_seed)
    return mixed(tasks, draws, {"kind": "joint", "sampling": sampling, "seed": joint_seed})
