"""Per-item scores: each item's score is its metric on that item alone, so their mean is the task's score."""

from __future__ import annotations

import pytest

from knowstack.evaluate.metrics import METRICS, PER_EXAMPLE
from knowstack.evaluate.old_knowledge import per_doc_scores

PREDICTIONS = ["yes", "The cat sat on the mat", "def f(x): return x + 1", "a simple sentence here", "42"]
REFERENCES = ["no", "the cat is on the mat", "def f(x): return x+1", "a simpler sentence", "42"]
SOURCES = ["q1", "q2", "q3", "a complicated sentence here indeed", "q5"]


@pytest.mark.parametrize("metric", ["accuracy", "rouge_l", "edit_similarity", "sari", "number_em", "math"])
def test_the_mean_of_per_item_scores_is_the_metric(metric: str) -> None:
    items = PER_EXAMPLE[metric](PREDICTIONS, REFERENCES, SOURCES)
    assert len(items) == len(PREDICTIONS)
    assert sum(items) / len(items) == pytest.approx(METRICS[metric](PREDICTIONS, REFERENCES, SOURCES))


def test_logged_samples_become_per_document_scores_in_doc_order() -> None:
    samples = [{"doc_id": 2, "acc": 1.0, "acc_norm": 0.0}, {"doc_id": 0, "acc": 0.0, "acc_norm": 1.0},
               {"doc_id": 1, "acc": 1.0, "acc_norm": 1.0}]
    assert per_doc_scores(samples, {"acc": 2 / 3, "acc_norm": 2 / 3}) == {"acc": [0.0, 1.0, 1.0],
                                                                          "acc_norm": [1.0, 1.0, 0.0]}
