"""`training.overlong: paper`: an overlong example cut as the paper's collator cuts it (RhuiDih/cl do_finetuning.py,
DataCollatorFlat2, L140-157), checked against cases worked by hand from that code. With prompt ids tok1 (BOS first),
answer + eos ids tok2 and window W, an example with len(tok1 + tok2) > W becomes:
  len(tok2) <= W // 2:  n1 = W - len(tok2);  tok1[:n1 // 2] + tok1[-(n1 - n1 // 2):], tok2 whole
  len(tok2) >  W // 2:  n1 = int(len(tok1) / len(tok1 + tok2) * W);  n2 = W - n1;  tok1 as above, tok2[:n2]
and its labels are -100 on tok1, tok2's ids on tok2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from test_step_keys import _every_method, _steps
from test_truncation import _bos_tokenizer

from knowstack.data.batches import IGNORE, tokenize_examples
from knowstack.data.formats import Example
from knowstack.data.truncation import fit_as_the_paper
from knowstack.modelio import load_tokenizer
from knowstack.train import SUMMARY_FILE, TrainSettings, train

P = 100  # prompt ids are 100, 101, ...; answer ids 1, 2, ...


def prompt(n: int) -> list[int]:
    return list(range(P, P + n))


def answer(n: int) -> list[int]:
    return list(range(1, n + 1))


# (prompt length, answer length, window) -> (kept prompt ids, kept answer ids), each worked by hand from the code
CASES = {
    "fits exactly": ((5, 5, 10), (prompt(5), answer(5))),
    # the answer (4) is at most half the window (5): n1 = 10 - 4 = 6, 3 from the start, 3 from the end
    "short answer": ((12, 4, 10), ([100, 101, 102, 109, 110, 111], answer(4))),
    # the answer is exactly half the window: still kept whole; n1 = 5: 2 from the start, 3 from the end
    "answer of half the window": ((8, 5, 10), ([100, 101, 105, 106, 107], answer(5))),
    # one token more: n1 = int(8 / 14 * 10) = int(5.71) = 5, n2 = 5, the answer's eos (its last id) is lost
    "answer of half the window + 1": ((8, 6, 10), ([100, 101, 105, 106, 107], answer(5))),
    # an odd window: W // 2 = 5, so 6 answer tokens are cut; n1 = int(9 / 15 * 11) = int(6.6) = 6, n2 = 5
    "odd window": ((9, 6, 11), ([100, 101, 102, 106, 107, 108], answer(5))),
    # an answer longer than the window alone (knowstack's own rule drops it): n1 = int(4 / 29 * 10) = 1, which the
    # slice tok1[:0] + tok1[-1:] fills with the prompt's last token; n2 = 9
    "answer alone too long": ((4, 25, 10), ([103], answer(9))),
    # float rounding: 30 / 44 * 22 is 15 exactly, 14.999999999999998 in floats, so n1 = 14 (7 + 7), n2 = 8
    "float share": ((30, 14, 22), ([*prompt(7), *range(P + 23, P + 30)], answer(8))),
    # n1 = int(2 / 32 * 10) = 0: tok1[:0] + tok1[-0:] is the whole prompt, so the example stays longer than the
    # window (12 tokens in 10), as it did in the paper; n2 = 10
    "share of zero": ((2, 30, 10), (prompt(2), answer(10))),
}


@pytest.mark.parametrize("case", CASES)
def test_the_paper_rule_on_hand_worked_cases(case: str) -> None:
    (p, a, window), expected = CASES[case]
    assert fit_as_the_paper(prompt(p), answer(a), window) == expected


def test_tokenize_examples_cuts_as_the_paper_with_the_bos_an_ordinary_prompt_token() -> None:
    tokenizer = _bos_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    long_prompt = Example("The official currency of Japan is " * 40 + "? Answer:", " the yen.")
    long_answer = Example("Q: name the currency of Japan, please:", " the yen" * 80)
    short = Example("France is in", " Europe.")
    counts: dict[str, int] = {}
    cut_prompt, cut_answer, whole = tokenize_examples(tokenizer, [long_prompt, long_answer, short], 32,
                                                      counts=counts, overlong="paper")
    assert counts == {"truncated": 1, "answer_cut": 1, "dropped": 0}

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    tok1, tok2 = [bos, *ids(long_prompt.prompt)], [*ids(long_prompt.answer), eos]
    n1 = 32 - len(tok2)  # the answer is short: kept whole
    assert list(cut_prompt.input_ids) == tok1[: n1 // 2] + tok1[-(n1 - n1 // 2):] + tok2
    assert list(cut_prompt.labels) == [IGNORE] * n1 + tok2

    tok1, tok2 = [bos, *ids(long_answer.prompt)], [*ids(long_answer.answer), eos]
    n1 = int(len(tok1) / (len(tok1) + len(tok2)) * 32)
    assert 0 < n1 < len(tok1) and len(tok2) > 16
    kept = tok2[: 32 - n1]
    assert list(cut_answer.input_ids) == tok1[: n1 // 2] + tok1[-(n1 - n1 // 2):] + kept
    assert list(cut_answer.labels) == [IGNORE] * n1 + kept and eos not in kept
    assert list(whole.input_ids) == [bos, *ids(short.prompt), *ids(short.answer), eos]


def test_knowstack_rule_is_the_default_and_counts_no_cut_answer() -> None:
    tokenizer = _bos_tokenizer()
    examples = [Example("Q:", " the yen" * 80), Example("France is in", " Europe.")]
    counts: dict[str, int] = {}
    assert tokenize_examples(tokenizer, examples, 32, counts=counts) == \
        tokenize_examples(tokenizer, examples, 32, overlong="keep-answer")
    assert counts == {"truncated": 0, "answer_cut": 0, "dropped": 1}


def test_training_with_the_paper_rule_counts_cut_answers(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    # an answer alone longer than the window: knowstack's rule drops it; the paper's keeps 5 of the prompt's 44 ids
    hopeless = Example("Question: what is seven times one, said again and again? Answer:", " 7. The answer is: 7" * 40)
    normal = [Example(f"Question: what is {i} plus {i + 1}? Answer:", f" {2 * i + 1}") for i in range(3)]
    settings = TrainSettings(finetune="fft", lr=1e-3, batch_size=4, micro_batch_size=4, max_length=48, epochs=1,
                             overlong="paper")
    summary = train(tiny_model_dir, [hopeless, *normal], tmp_path / "out", settings, progress_desc="fft-paper")
    written = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert written["answer_cut_examples"] == summary["answer_cut_examples"] == 1
    assert written["dropped_examples"] == written["truncated_examples"] == 0
    assert written["unique_examples"] == 4 and written["settings"]["overlong"] == "paper"
    prompt_ids = len(tokenizer(hopeless.prompt)["input_ids"])
    answer_ids = len(tokenizer(hopeless.answer, add_special_tokens=False)["input_ids"]) + 1
    share = int(prompt_ids / (prompt_ids + answer_ids) * 48)
    assert share == 5
    kept = 48 - share
    normal_answers = [len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) + 1 for ex in normal]
    assert written["answer_tokens"] == kept + sum(normal_answers)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert lines == ["warning: fft-paper: 1 of 4 training examples are longer than max_length (48 tokens): 0 had the "
                     "middle of their prompt cut (answer kept), 1 had their answer cut (the paper's rule)"]


def test_the_paper_rules_warning_never_says_dropped(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """Under the paper's rule nothing is dropped: a run that cut prompts only says so, not '0 were dropped'."""
    long_prompt = Example("Question: " + "what is seven times one? " * 20 + "Answer:", " 7")
    normal = [Example(f"Question: what is {i} plus {i + 1}? Answer:", f" {2 * i + 1}") for i in range(3)]
    settings = TrainSettings(finetune="fft", lr=1e-3, batch_size=4, micro_batch_size=4, max_length=48, epochs=1,
                             overlong="paper")
    train(tiny_model_dir, [long_prompt, *normal], tmp_path / "out", settings, progress_desc="fft-paper")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert lines == ["warning: fft-paper: 1 of 4 training examples are longer than max_length (48 tokens): 1 had the "
                     "middle of their prompt cut (answer kept), 0 had their answer cut (the paper's rule)"]


def test_the_train_command_takes_the_paper_rule(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`knowstack train --overlong paper` (a study's training.overlong, on one run): the hopeless example above is
    cut, not dropped, as it is by default."""
    from knowstack.cli import main

    hopeless = {"prompt": "Question: what is seven times one, said again and again? Answer:",
                "answer": " 7. The answer is: 7" * 40}
    normal = [{"prompt": f"Question: what is {i} plus {i + 1}? Answer:", "answer": f" {2 * i + 1}"} for i in range(3)]
    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "test"):
        (task / f"{split}.json").write_text(json.dumps([hopeless, *normal]))
    common = ["train", "--model", str(tiny_model_dir), "--task", str(task), "--finetune", "fft", "--lr", "1e-3",
              "--batch-size", "4", "--micro-batch-size", "4", "--max-length", "48", "--epochs", "1"]
    for rule, cut, dropped in (("paper", 1, 0), (None, 0, 1)):
        out = tmp_path / f"out-{rule}"
        assert main([*common, *(["--overlong", rule] if rule else []), "--out", str(out)]) == 0
        written = json.loads((out / SUMMARY_FILE).read_text())
        assert (written["answer_cut_examples"], written["dropped_examples"]) == (cut, dropped)
        assert written["settings"]["overlong"] == (rule or "keep-answer")


def test_the_default_rule_is_in_no_step_key_and_the_paper_rule_in_the_training_steps_only(tmp_path: Path) -> None:
    raw = _every_method(tmp_path)
    plain = _steps(raw, tmp_path)
    assert not any("overlong" in json.dumps(step.params) for step in plain.values())  # keys as before the setting
    explicit, paper = copy.deepcopy(raw), copy.deepcopy(raw)
    explicit["training"]["overlong"] = "keep-answer"
    paper["training"]["overlong"] = "paper"
    assert _steps(explicit, tmp_path).keys() == plain.keys()
    changed = [step for step in _steps(paper, tmp_path).values() if "overlong" in json.dumps(step.params)]
    assert changed and {step.kind for step in changed} == {"train"}
    assert all(step.params["training"]["overlong"] == "paper" for step in changed)
