"""Overlong examples keep their answers: the middle of the prompt is cut, in training and in evaluation alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_tiny_tokenizer
from tokenizers import processors

from knowstack.data.batches import IGNORE, tokenize_examples
from knowstack.data.formats import Example
from knowstack.data.truncation import truncate_middle
from knowstack.evaluate.generate import _encode
from knowstack.modelio import load_tokenizer
from knowstack.train import SUMMARY_FILE, TrainSettings, train


def test_truncate_middle_keeps_both_ends() -> None:
    ids = list(range(10))
    assert truncate_middle(ids, 10) == ids
    assert truncate_middle(ids, 20) == ids
    # the paper's collator: budget // 2 from the start, the rest from the end
    assert truncate_middle(ids, 5) == [0, 1, 7, 8, 9]
    assert truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert truncate_middle(ids, 1) == [9]
    assert truncate_middle(ids, 0) == []
    assert truncate_middle(ids, 5, keep_first=1) == [0, 1, 2, 8, 9]
    assert truncate_middle(ids, 1, keep_first=1) == [0]
    with pytest.raises(ValueError):
        truncate_middle(ids, -1)


def _bos_tokenizer():
    tokenizer = build_tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_token_id)])
    return tokenizer


def test_evaluation_prompts_lose_their_middle_and_keep_bos() -> None:
    tokenizer = _bos_tokenizer()
    prompt = "Below is an instruction. " + "France is in Europe. " * 50 + "Question: what is 3 plus 4? Answer:"
    ids = tokenizer(prompt)["input_ids"]
    [fitted], cut = _encode(tokenizer, [prompt], 21)
    assert cut == 1 and len(fitted) == 21
    assert fitted == [tokenizer.bos_token_id] + ids[1:11] + ids[-10:]
    [short], cut = _encode(tokenizer, ["France"], 21)
    assert cut == 0 and short == tokenizer("France")["input_ids"]


def test_training_cuts_the_prompt_never_the_answer() -> None:
    tokenizer = _bos_tokenizer()
    answer = " the yen."
    long = Example("The official currency of Japan is " * 40 + "? Answer:", answer)
    too_long_answer = Example("Q:", " the yen" * 80)
    short = Example("France is in", " Europe.")
    counts: dict[str, int] = {}
    kept = tokenize_examples(tokenizer, [long, too_long_answer, short], 32, counts=counts)
    assert counts == {"truncated": 1, "answer_cut": 0, "dropped": 1}
    assert len(kept) == 2
    cut, whole = kept
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = tokenizer(long.prompt, add_special_tokens=False)["input_ids"]
    room = 32 - 1 - len(answer_ids)
    assert len(cut) == 32
    assert list(cut.input_ids) == [tokenizer.bos_token_id] + truncate_middle(prompt_ids, room) + answer_ids
    assert list(cut.labels) == [IGNORE] * (1 + room) + answer_ids
    assert cut.answer_tokens == len(answer_ids)
    assert list(whole.input_ids[-3:]) == tokenizer(" Europe.", add_special_tokens=False)["input_ids"][-2:] + [
        tokenizer.eos_token_id]


def test_a_million_character_prompt_trains_on_its_answer(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    huge = Example("France is in Europe. " * 50_000 + "The official currency of Japan is", " the yen.")
    assert len(huge.prompt) > 1_000_000
    hopeless = Example("Question:", " 7. The answer is: 7" * 40)
    normal = [Example(f"Question: what is {i} plus {i + 1}? Answer:", f" {2 * i + 1}") for i in range(6)]
    settings = TrainSettings(finetune="fft", lr=1e-3, batch_size=4, micro_batch_size=4, max_length=48, epochs=1)
    summary = train(tiny_model_dir, [huge, hopeless, *normal], tmp_path / "out", settings, progress_desc="fft-huge")
    written = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert written["truncated_examples"] == summary["truncated_examples"] == 1
    assert written["dropped_examples"] == 1
    assert written["unique_examples"] == written["examples"] == 7
    answer_tokens = [len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) + 1 for ex in [huge, *normal]]
    assert written["answer_tokens"] == sum(answer_tokens)  # the huge example's answer is trained on, whole
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert lines == ["warning: fft-huge: 2 of 8 training examples are longer than max_length (48 tokens): 1 had the "
                     "middle of their prompt cut (answer kept), 1 were dropped (answer alone too long)"]


def test_examples_that_fit_are_untouched(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    example = Example("Question: what is 3 plus 4? Answer:", " 7")
    counts: dict[str, int] = {}
    [tokenized] = tokenize_examples(tokenizer, [example], 64, counts=counts)
    ids = tokenizer(example.prompt + example.answer, add_special_tokens=False)["input_ids"]
    assert list(tokenized.input_ids) == ids + [tokenizer.eos_token_id]
    assert counts == {"truncated": 0, "answer_cut": 0, "dropped": 0}
