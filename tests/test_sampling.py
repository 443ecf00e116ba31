"""Joint and replay samplers: exact counts, upsampling, determinism."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from knowstack.data.sampling import derive_seed, draw, joint_sample, replay_count, replay_sample


def test_replay_draws_fraction_of_the_current_task_from_every_earlier_task() -> None:
    draws = replay_sample(current_size=800, earlier_sizes=[800, 1000, 50], fraction=0.1, seed=3)
    assert [d.count for d in draws] == [80, 80, 80]
    assert [len(d.indices()) for d in draws] == [80, 80, 80]
    # A task at least as large as the sample: distinct examples, no repeats.
    assert len(set(draws[0].indices())) == 80 and draws[0].copies == 0
    assert all(0 <= i < 1000 for i in draws[1].indices())
    # A smaller task is upsampled: one whole copy plus 30 distinct others.
    small = Counter(draws[2].indices())
    assert draws[2].copies == 1 and len(draws[2].extra) == 30
    assert set(small) == set(range(50)) and sorted(Counter(small.values()).items()) == [(1, 20), (2, 30)]


def test_replay_count_rounds_half_up() -> None:
    assert replay_count(5000, 0.1) == 500
    assert replay_count(395_000, 0.1) == 39_500  # the paper's math round
    assert replay_count(25, 0.1) == 3  # 2.5 -> 3, not Python's round-half-even 2
    assert replay_count(4, 0.1) == 0


def test_samplers_are_deterministic_in_the_seed() -> None:
    first = replay_sample(100, [60, 200, 7], 0.3, seed=1)
    assert first == replay_sample(100, [60, 200, 7], 0.3, seed=1)
    assert first != replay_sample(100, [60, 200, 7], 0.3, seed=2)
    joint = joint_sample([10, 37, 5], "uniform", seed=1)
    assert joint == joint_sample([10, 37, 5], "uniform", seed=1)
    assert joint != joint_sample([10, 37, 5], "uniform", seed=2)
    assert derive_seed(0, "replay", "notes") == derive_seed(0, "replay", "notes")
    assert derive_seed(0, "replay", "notes") != derive_seed(0, "replay", "code")
    assert derive_seed(0, "replay", "notes") != derive_seed(1, "replay", "notes")


def test_joint_uniform_draws_every_task_equally_often() -> None:
    draws = joint_sample([10, 37, 5], "uniform", seed=0)
    assert [d.count for d in draws] == [37, 37, 37]
    assert draws[1].copies == 1 and not draws[1].extra  # the largest task is used once, whole
    counts = Counter(draws[2].indices())
    assert set(counts.values()) == {7, 8} and sum(counts.values()) == 37  # 5 x 7 + 2 extra


def test_joint_proportional_uses_every_task_once() -> None:
    draws = joint_sample([10, 37, 5], "proportional", seed=0)
    assert [d.indices() for d in draws] == [list(range(10)), list(range(37)), list(range(5))]


def test_draw_record_is_compact_and_exact() -> None:
    d = draw(size=3, count=8, rng=random.Random(0))
    record = d.to_dict()
    assert record["count"] == 8 and record["copies"] == 2 and len(record["extra"]) == 2
    assert sorted(d.indices()) == sorted([0, 1, 2] * 2 + record["extra"])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: replay_sample(10, [5], 0.0, 0), "fraction"),
        (lambda: joint_sample([5], "random", 0), "sampling"),
        (lambda: joint_sample([], "uniform", 0), "at least one"),
        (lambda: draw(0, 3, random.Random(0)), "empty"),
    ],
)
def test_bad_inputs(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
