"""Finished rows leave a generating batch (evaluate/generate.py): every output stays what the whole batch makes,
the batch shrinks only to sizes that compute alike, never on a model that routes tokens to experts, and what it
saved is counted and recorded with the task's scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from knowstack.data.formats import Example
from knowstack.evaluate.generate import generate, may_shrink, routes_tokens, rows_kept_identical
from knowstack.evaluate.new_knowledge import evaluate_task
from knowstack.modelio import load_model, load_tokenizer

# prompts of different lengths (left padding), whose continuations end at different steps on a stop string
PROMPTS = [("def add(a, b): " * (1 + i % 5))[: 5 + 7 * i] for i in range(20)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(tiny_model_dir, dtype="float32"), load_tokenizer(tiny_model_dir)


def test_dropping_finished_rows_leaves_every_output_as_the_whole_batch_makes_it(tiny) -> None:  # noqa: ANN001
    model, tokenizer = tiny
    assert rows_kept_identical(model, 20) == [8, 16], "on this machine's kernels a batch of 20 rows may shrink"
    for stops in (["a"], ["e", "("], None):
        whole, dropped = {}, {}
        expected = generate(model, tokenizer, PROMPTS, max_new_tokens=30, batch_size=20, stop_strings=stops,
                            stats=whole, drop_finished=False)
        made = generate(model, tokenizer, PROMPTS, max_new_tokens=30, batch_size=20, stop_strings=stops,
                        stats=dropped)
        assert made == expected
        assert whole["row_tokens_saved"] == 0
        assert dropped["row_tokens"] + dropped["row_tokens_saved"] == whole["row_tokens"]
        if stops == ["a"]:  # rows end from the first steps to the budget: the batch shrinks twice
            assert dropped["row_tokens_saved"] > 0 and len({len(text) for text in made}) > 2


def test_a_batch_shrinks_only_to_sizes_that_compute_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that sums a smaller batch another way: no size below the batch is allowed then."""
    assert rows_kept_identical(torch.nn.Sequential(torch.nn.Linear(8, 9)), 64) == [8, 16, 24, 32, 40, 48, 56]
    original = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: original(x, w, b) + (x.shape[0] < 64) * 1e-7)
    assert rows_kept_identical(torch.nn.Sequential(torch.nn.Linear(8, 10)), 64) == []


def test_every_matrix_of_the_model_is_checked_not_only_its_linear_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA-MoE multiplies the rows by stacked LoRA pairs held as plain parameters: their shapes count too."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    model.register_parameter("lora_A", torch.nn.Parameter(torch.randn(3, 8)))
    original = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: original(x, w, b) + (x.shape[0] < 64 and w.shape[0] == 3) * 1e-7)
    assert rows_kept_identical(torch.nn.Sequential(torch.nn.Linear(8, 8)), 64) != []
    assert rows_kept_identical(model, 64) == []


def test_a_model_that_routes_tokens_to_experts_keeps_its_batch(tiny) -> None:  # noqa: ANN001
    """An expert's products run over the tokens that chose it: their count changes when rows leave."""
    model, tokenizer = tiny
    assert not routes_tokens(model) and may_shrink(model)
    stats: dict = {}
    model.config.num_local_experts = 4  # what Mixtral's and knowstack's MoE configs say
    try:
        assert routes_tokens(model) and not may_shrink(model)
        generate(model, tokenizer, PROMPTS, max_new_tokens=30, batch_size=20, stop_strings=["a"], stats=stats)
    finally:
        del model.config.num_local_experts
    assert stats["row_tokens_saved"] == 0 and stats["row_tokens"] > 0


def test_a_task_score_records_what_each_generation_computed_and_saved(tiny) -> None:  # noqa: ANN001
    model, tokenizer = tiny
    examples = [Example(prompt, "a") for prompt in PROMPTS]
    record = evaluate_task(model, tokenizer, examples, "accuracy", batch_size=20, max_new_tokens=30).record()
    counts = record["row_tokens"]["accuracy"]
    assert set(counts) == {"row_tokens", "row_tokens_saved"} and counts["row_tokens"] > 0


def test_a_batch_on_a_device_not_checked_keeps_its_rows(tiny, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """A GPU's attention may split its sums by the number of rows: no shrinking there until checked on one."""
    model, _ = tiny
    weight = next(model.parameters())
    monkeypatch.setattr(type(weight), "device", property(lambda self: torch.device("cuda", 0)))
    assert not may_shrink(model)


def test_a_row_kept_only_to_fill_the_batch_is_not_generated_on() -> None:
    """A finished row that stays to keep the batch at an allowed size ends at once in the next generate() call: its
    stop string may lie before the window the stop check reads, and it must not keep the batch running."""
    from knowstack.evaluate import generate as module

    ids = torch.tensor([[5, 6, 7], [5, 6, 8], [5, 6, 9]])
    watch = module._UntilSmaller(None, torch.tensor([True, False, False]), 0, eos=None)
    assert watch(ids, torch.zeros(3, 4)).tolist() == [True, False, False]
    shrink = module._UntilSmaller(None, torch.tensor([True, False, False]), 2, eos=None)
    assert shrink(ids, torch.zeros(3, 4)).tolist() == [True, True, True]  # two rows run: they fit a batch of 2
    ended = module._UntilSmaller(None, torch.tensor([False, False, False]), 0, eos=9)
    assert ended(ids, torch.zeros(3, 4)).tolist() == [False, False, True]
