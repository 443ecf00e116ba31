"""Metrics checked against reference implementations and published values."""

from __future__ import annotations

import pytest
from rapidfuzz import fuzz
from rouge_score import rouge_scorer

from knowstack.data.formats import final_number, first_number, gsm8k_final_answer, normalize_number
from knowstack.evaluate.metrics import METRICS, rouge_l_f1, sari_sentence

PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("Hello, World!", "hello world again"),
    ("", "something"),
    ("def f(x): return x+1", "def f(y): return y + 1"),
    ("Plurinational State of Bolivia", "Bolivia"),
    ("a b c d e f", "f e d c b a"),
]


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_rouge_l_matches_rouge_score(prediction: str, reference: str) -> None:
    oracle = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l_f1(prediction, reference) == pytest.approx(oracle)


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_edit_similarity_is_the_levenshtein_ratio(prediction: str, reference: str) -> None:
    assert METRICS["edit_similarity"]([prediction], [reference], [""]) == pytest.approx(
        fuzz.ratio(prediction, reference) / 100)


def test_sari_published_example() -> None:
    # The example of the SARI metric card of HF evaluate (EASSE-compatible): 26.953601953601954.
    source = "About 95 species are currently accepted."
    references = ["About 95 species are currently known.", "About 95 species are now accepted.",
                  "95 species are now accepted."]
    assert sari_sentence(source, "About 95 you now get in.", references) * 100 == pytest.approx(26.953601953601954)


def test_sari_rewards_the_reference_edit() -> None:
    source = "The delegation of the Federal Republic of Germany arrived."
    reference = "The delegation of Germany arrived."
    copy = METRICS["sari"]([source], [reference], [source])
    exact = METRICS["sari"]([reference], [reference], [source])
    assert exact > 0.95 and copy < exact - 0.2


def test_accuracy_strips_whitespace() -> None:
    assert METRICS["accuracy"]([" favor", "none\n", "against"], ["favor", "none", "favor"], ["", "", ""]) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("3 apples plus 4 is 7. The answer is: 7", "7"),
        ("So 1,200 + 34 = 1,234.\n#### 1,234", "1234"),
        ("she has 5 then 12.50 dollars", "12.5"),
        ("no number here", None),
        ("The answer is: -3.", "-3"),
    ],
)
def test_final_number(generation: str, expected: str | None) -> None:
    assert final_number(generation) == expected


def test_number_helpers() -> None:
    assert first_number(" 42 because 6*7") == "42"
    assert normalize_number("1,000.0") == "1000"
    assert gsm8k_final_answer("2+2=4\n#### 4") == "4"
    assert METRICS["number_em"](["4", "", "5"], ["4", "0", "6"], ["", "", ""]) == pytest.approx(1 / 3)
