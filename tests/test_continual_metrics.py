"""FWT, forgetting and average incremental score on a hand-made R[stage][task], checked against the formulas
written out by hand (GEM's FWT, Chaudhry et al.'s forgetting), including a task whose best score was at a middle
stage, where forgetting and BWT differ; and their paired intervals."""

from __future__ import annotations

import numpy as np
import pytest

from knowstack.report.runs import (
    average_incremental,
    backward_transfer,
    find_runs,
    forgetting,
    forward_transfer,
    mean_defined,
)
from knowstack.report.tables import Scores
from knowstack.results import Row
from knowstack.stats import Estimate, interval_of, maximum_of

TASKS = ["a", "b", "c"]
BASE = {"a": 0.1, "b": 0.2, "c": 0.3}
# R[t][task] after round t (round t trains TASKS[t]); task a peaks after round 2, not after its own round 1.
R = [{"a": 0.5, "b": 0.25, "c": 0.3},
     {"a": 0.6, "b": 0.7, "c": 0.4},
     {"a": 0.4, "b": 0.5, "c": 0.9}]


def rows(base: dict[str, float], matrix: list[dict[str, float]]) -> list[Row]:
    out = [Row("base", "base", "", None, t, "new", "accuracy", v, 10, "") for t, v in base.items()]
    for stage, scores in enumerate(matrix, start=1):
        out += [Row(f"sequential-lora-{stage}", "sequential", "lora", stage, t, "new", "accuracy", v, 10,
                    TASKS[stage - 1]) for t, v in scores.items()]
    return out


def staged_run(scores: Scores):
    return next(r for r in find_runs(scores) if r.staged)


def by_task(values: dict) -> dict[str, object]:
    return {column[1]: value for column, value in values.items()}


def test_fwt_forgetting_and_average_incremental_on_a_hand_made_matrix() -> None:
    scores = Scores.from_rows(rows(BASE, R), TASKS)
    run = staged_run(scores)
    fwt = by_task(forward_transfer(scores, run))
    # GEM: R[i-1][i] - b_i for i = 2..T; the first task has none.
    assert fwt["a"] == "—"
    assert fwt["b"] == pytest.approx(R[0]["b"] - BASE["b"])  # 0.05
    assert fwt["c"] == pytest.approx(R[1]["c"] - BASE["c"])  # 0.1
    assert mean_defined(list(fwt.values())) == pytest.approx((0.05 + 0.1) / 2)
    forget = by_task(forgetting(scores, run))
    # Chaudhry: max over rounds 1..T-1 of R[l][j], minus R[T][j], for j = 1..T-1.
    assert forget["a"] == pytest.approx(0.6 - 0.4)  # best at round 2, a middle stage
    assert forget["b"] == pytest.approx(0.7 - 0.5)
    assert forget["c"] == "—"
    assert mean_defined(list(forget.values())) == pytest.approx(0.2)
    # BWT starts from the score right after the task's own round: for a, 0.5 -> 0.4 (-20%), while its
    # forgetting starts from 0.6: the two differ exactly where the best score came later.
    bwt = by_task(backward_transfer(scores, run))
    assert bwt["a"] == pytest.approx(-20.0) and bwt["b"] == pytest.approx((0.5 - 0.7) / 0.7 * 100)
    assert -bwt["a"] / 100 * R[0]["a"] != pytest.approx(forget["a"])
    # Mean over rounds t of the mean over tasks 1..t after round t.
    expected = (R[0]["a"] + (R[1]["a"] + R[1]["b"]) / 2 + (R[2]["a"] + R[2]["b"] + R[2]["c"]) / 3) / 3
    assert average_incremental(scores, run) == pytest.approx(expected)


def test_a_partial_run_scores_only_its_rounds() -> None:
    scores = Scores.from_rows(rows(BASE, R[:2]), TASKS)
    run = staged_run(scores)
    assert by_task(forward_transfer(scores, run)) == {"a": "—", "b": pytest.approx(0.05), "c": "—"}
    # a rose from 0.5 to 0.6 in round 2: negative forgetting, as the formula gives
    assert by_task(forgetting(scores, run)) == {"a": pytest.approx(-0.1), "b": "—", "c": "—"}
    assert average_incremental(scores, run) == pytest.approx((0.5 + 0.65) / 2)


def test_metrics_carry_paired_intervals_from_per_item_scores() -> None:
    """With per-item scores, each metric is an Estimate whose replicates are the metric computed on the same
    resampled items for every model (paired): forgetting's best earlier score is the maximum per replicate."""
    n, rng = 40, np.random.default_rng(1)
    items = {}
    for row in rows(BASE, R):
        k = round(row.value * n)
        per_item = [1.0] * k + [0.0] * (n - k)
        rng.shuffle(per_item)
        items[(row.model, row.kind, row.task, row.metric)] = {None: per_item}
    scores = Scores.from_rows(rows(BASE, R), TASKS, items=items)
    run = staged_run(scores)
    forget_a = by_task(forgetting(scores, run))["a"]
    fwt_b = by_task(forward_transfer(scores, run))["b"]
    assert isinstance(forget_a, Estimate) and isinstance(fwt_b, Estimate)
    assert interval_of(forget_a) is not None and interval_of(fwt_b) is not None
    earlier = [scores.value(f"sequential-lora-{s}", ("new", "a", "accuracy")) for s in (1, 2)]
    last = scores.value("sequential-lora-3", ("new", "a", "accuracy"))
    np.testing.assert_allclose(forget_a.draws, np.maximum(earlier[0].draws, earlier[1].draws) - last.draws)
    assert interval_of(average_incremental(scores, run)) is not None


def test_maximum_of_keeps_replicates_only_when_all_have_them() -> None:
    a, b = Estimate(0.5, np.array([0.4, 0.7])), Estimate(0.6, np.array([0.65, 0.5]))
    best = maximum_of([a, b])
    assert float(best) == 0.6 and list(best.draws) == [0.65, 0.7]
    plain = maximum_of([a, 0.55])
    assert plain == 0.55 and interval_of(plain) is None


def test_report_shows_fwt_and_forgetting_beside_bwt() -> None:
    from knowstack.report.build import build_report, render_report

    text = render_report(rows(BASE, R), title="t", task_order=TASKS)
    lines = text.splitlines()
    assert next(line for line in lines if line.startswith("| FWT")) == "| FWT | — | +0.0500 | +0.1000 |  |"
    assert next(line for line in lines if line.startswith("| forgetting")) == "| forgetting | +0.2000 | +0.2000 | — |  |"
    continual = next(b for s in build_report(rows(BASE, R), title="t", task_order=TASKS) for b in s.walk()
                     if getattr(b, "key", "") == "continual")
    row = continual.rows[0]
    assert row.label == "sequential LoRA" and row.cells[2] == pytest.approx(0.075) and row.cells[3] == pytest.approx(0.2)
