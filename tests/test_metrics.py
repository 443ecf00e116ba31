"""Metrics checked against reference implementations and published values."""

from __future__ import annotations

import pytest
from rapidfuzz import fuzz
from rouge_score import rouge_scorer

from knowstack.data.formats import final_number, first_number, gsm8k_final_answer, normalize_number
from knowstack.evaluate.metrics import METRICS, rouge_l_f1, sari_sentence, tokenize_13a

PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("Hello, World!", "hello world again"),
    ("", "something"),
    ("something", ""),
    ("", ""),
    ("!!! ...", "?"),
    ("def f(x): return x+1", "def f(y): return y + 1"),
    ("Plurinational State of Bolivia", "Bolivia"),
    ("a b c d e f", "f e d c b a"),
    ("Côte d'Ivoire uses the CFA franc (XOF)", "Côte d’Ivoire: West African CFA franc"),
    ("the the the cat", "the cat the the"),
    ("Line one.\nLine two, 3.5 km", "line two 3 5 km line one"),
]


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_rouge_l_matches_rouge_score(prediction: str, reference: str) -> None:
    oracle = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l_f1(prediction, reference) == pytest.approx(oracle)


@pytest.mark.parametrize(("prediction", "reference"), [p for p in PAIRS if p[0]])
def test_edit_similarity_is_the_levenshtein_ratio(prediction: str, reference: str) -> None:
    assert METRICS["edit_similarity"]([prediction], [reference], [""]) == pytest.approx(
        fuzz.ratio(prediction.strip(), reference.strip()) / 100)


def test_edit_similarity_follows_trace_on_empty_and_py150_literals() -> None:
    # TRACE scores an empty prediction 0, and restores Py150's <NUM_LIT>/<STR_LIT:x> before comparing.
    assert METRICS["edit_similarity"]([""], [""], [""]) == 0.0
    assert METRICS["edit_similarity"](["x = 0"], ["x = <NUM_LIT>"], [""]) == 1.0
    assert METRICS["edit_similarity"](["s = 'ab'"], ["s = '<STR_LIT:ab>'"], [""]) == 1.0


def test_sari_tokenization_is_sacrebleu_13a() -> None:
    sacrebleu = pytest.importorskip("sacrebleu.tokenizers.tokenizer_13a")
    oracle = sacrebleu.Tokenizer13a()
    texts = ["About 95 species are currently accepted.", "It costs $1,000.50 (roughly) -- or 3-4 euros!",
             "don't split well-known e.g. U.S.A. x_y <skipped> &amp; &quot;q&quot;", "a\nb-\nc", "", "  ",
             "Zürich's 20 Minuten: 5.5% (ca.) [x] {y} ~z/w @k #1 ^2 `c` 'q' \"d\"", "1990-2000, 3.14, end."]
    for text in texts:
        assert tokenize_13a(text) == oracle(text).split(), text


def test_sari_published_example() -> None:
    # The example of the SARI metric card of HF evaluate (EASSE-compatible): 26.953601953601954.
    source = "About 95 species are currently accepted."
    references = ["About 95 species are currently known.", "About 95 species are now accepted.",
                  "95 species are now accepted."]
    assert sari_sentence(source, "About 95 you now get in.", references) * 100 == pytest.approx(26.953601953601954)


def test_sari_hand_computed() -> None:
    # Source "a b", output "a", reference "b". Unigrams: keep P=0, R=0 -> F=0; deleting "b" is wrong ->
    # P=0; nothing added and nothing to add -> add F=1 (0/0 counts as 1). Orders 2-4 are empty -> 1 each.
    # SARI = (mean(0,1,1,1) + mean(0,1,1,1) + mean(1,1,1,1)) / 3 = (0.75 + 0.75 + 1) / 3.
    assert sari_sentence("a b", "a", ["b"]) == pytest.approx(2.5 / 3)
    assert sari_sentence("A b.", "a B .", ["a b."]) == pytest.approx(1.0)  # lowercased, 13a-tokenized


def test_sari_multiple_references_scale_counts() -> None:
    # Source and output counts are scaled by the number of references, so k copies of one reference
    # score exactly as that reference alone; a second, different reference changes the score.
    source, output, reference = "The big cat sat on the mat.", "The cat sat on a mat.", "The cat sat on the mat."
    single = sari_sentence(source, output, [reference])
    assert sari_sentence(source, output, [reference] * 3) == pytest.approx(single)
    assert sari_sentence(source, output, [reference, "A cat sat on a mat."]) != pytest.approx(single)
    assert sari_sentence("The big cat sat.", "The cat sat.", ["The cat sat."] * 3) == pytest.approx(1.0)


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


def test_math_metric_extracts_the_final_number() -> None:
    generations = ["2 + 2 = 4. The answer is: 4", "#### 1,000", "I think 3 or 5", "no idea"]
    assert METRICS["math"](generations, ["4", "1000", "3", "0"], [""] * 4) == pytest.approx(2 / 4)


def test_every_metric_is_on_the_unit_scale_and_registered() -> None:
    assert set(METRICS) >= {"accuracy", "rouge_l", "edit_similarity", "sari", "math"}
    for name, metric in METRICS.items():
        value = metric(["the cat sat"], ["the cat sat"], ["the big cat sat"])
        assert 0.0 <= value <= 1.0, name
