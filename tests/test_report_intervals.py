"""Intervals on every number of the report: per-item scores -> paired bootstrap replicates -> every table cell,
figure and verdict; seeds add their variance; claims can be inconclusive."""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np
import pytest
from report_rows import TASKS, synthetic_study

from knowstack.report.build import build_report, write_report
from knowstack.report.claims import FAILS, HOLDS, INCONCLUSIVE, Check, _s, check_verdict, evaluate_claims
from knowstack.report.figures import FigureSpec, _column_indexes, _errors, plotted_rows
from knowstack.report.runs import find_runs
from knowstack.report.tables import Scores, Table
from knowstack.results import Row, read_csv, read_items, write_csv, write_items
from knowstack.stats import Estimate, column_estimate, interval_of

N_NEW, N_OLD = 50, 120


def _pattern(key: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    values = rng.normal(size=n)
    return values - values.mean()


def items_for(rows: list[Row], noise: float, seeds: dict[str, int | None] | None = None) -> dict:
    """Per-item scores whose mean is each row's value: a per-task pattern every model shares (items differ in
    difficulty) plus `noise` of the model's own, so paired differences have a spread."""
    items: dict = {}
    for row in rows:
        n = N_NEW if row.kind == "new" else N_OLD
        scores = row.value + 0.3 * _pattern(f"{row.kind}/{row.task}", n) + noise * _pattern(
            f"{row.model}/{row.seed}/{row.kind}/{row.task}/{row.metric}", n)
        items.setdefault((row.model, row.kind, row.task, row.metric), {})[row.seed] = scores.tolist()
    return items


def tables_of(sections) -> dict[str, Table]:
    return {b.key: b for s in sections for b in [s, *s.walk()] if isinstance(b, Table)}


def figures_of(sections) -> list[FigureSpec]:
    return [b for s in sections for b in [s, *s.walk()] if isinstance(b, FigureSpec)]


def test_every_number_of_every_table_and_figure_has_an_interval(tmp_path: Path) -> None:
    rows = synthetic_study()
    sections = build_report(rows, title="t", task_order=TASKS, items=items_for(rows, 0.05))
    numbers = 0
    for key, table in tables_of(sections).items():
        for row in table.rows:
            for cell, unit in zip(row.cells, row.units, strict=True):
                if isinstance(cell, float) and unit in ("score", "percent"):
                    numbers += 1
                    assert interval_of(cell) is not None, (key, row.label)
                    low, high = interval_of(cell)
                    assert low <= high
    assert numbers > 500
    for spec in figures_of(sections):
        rows_drawn = plotted_rows(spec) if spec.kind != "frontier" else spec.table.rows
        cells = [r.cells[j] for r in rows_drawn for j in _column_indexes(spec) if isinstance(r.cells[j], float)]
        if cells:
            assert _errors(cells) is not None, spec.key
    page = write_report(rows, tmp_path, title="t", task_order=TASKS, items=items_for(rows, 0.05))
    report = (tmp_path / "report.md").read_text()
    assert page.is_file() and "[" in report.split("## Base model", 1)[1]
    fig8 = (tmp_path / "tables" / "fig8_fully_cooperative.csv").read_text().splitlines()
    assert "AVall ci_low" in fig8[0] and "AVall ci_high" in fig8[0]


def test_differences_are_paired_and_gains_and_bwt_carry_intervals() -> None:
    rows = synthetic_study(("base", "sequential"))
    scores = Scores.from_rows(rows, TASKS, items=items_for(rows, 0.05))
    column = ("new", "stance", "accuracy")
    first, last = scores.value("sequential-fft-1", column), scores.value("sequential-fft-7", column)
    paired = interval_of(last - first)
    # unpaired: each score's own spread is dominated by the shared item difficulty, which pairing removes
    own = interval_of(first)
    assert paired[1] - paired[0] < (own[1] - own[0]) / 2
    bwt = (last - first) / abs(first) * 100
    assert interval_of(bwt) is not None and isinstance(bwt, Estimate)


def test_verdicts_are_inconclusive_where_the_noise_covers_the_difference() -> None:
    rows = synthetic_study()
    runs_quiet = evaluate_claims(*_scores_and_runs(rows, 0.0))
    runs_noisy = evaluate_claims(*_scores_and_runs(rows, 3.0))
    quiet = {v.claim.id: v.verdict for v in runs_quiet}
    noisy = {v.claim.id: v.verdict for v in runs_noisy}
    assert INCONCLUSIVE not in quiet.values() and quiet["C1"] == HOLDS
    assert INCONCLUSIVE in noisy.values()
    assert all(noisy[c] in (quiet[c], INCONCLUSIVE) for c in quiet)  # noise never flips a verdict
    evidence = next(v for v in runs_noisy if v.claim.id == "C1").outcomes[0].evidence
    assert "difference " in evidence and " [" in evidence


def _scores_and_runs(rows: list[Row], noise: float) -> tuple[Scores, list]:
    scores = Scores.from_rows(rows, TASKS, items=items_for(rows, noise))
    return scores, [r for r in find_runs(scores) if not r.point]


@pytest.mark.parametrize(("op", "left", "right", "expected"), [
    (">", (0.60, 0.01), (0.50, 0.01), HOLDS), (">", (0.50, 0.01), (0.60, 0.01), FAILS),
    (">", (0.51, 0.20), (0.50, 0.20), INCONCLUSIVE), ("<", (0.40, 0.01), (0.50, 0.01), HOLDS),
    ("~", (0.50, 0.005), (0.51, 0.005), HOLDS), ("~", (0.30, 0.005), (0.60, 0.005), FAILS),
    ("~", (0.50, 0.40), (0.53, 0.40), INCONCLUSIVE),
])
def test_check_verdict_reads_the_interval_of_the_difference(op, left, right, expected) -> None:
    def estimate(value: float, spread: float, seed: int) -> Estimate:
        base = _pattern("shared", 200)
        own = np.random.default_rng(seed).normal(size=200) * spread * 10
        return column_estimate([value + base + own - own.mean()], "new/x")

    assert check_verdict(op, estimate(*left, 1), estimate(*right, 2)) == expected
    assert check_verdict(op, left[0], right[0]) in (HOLDS, FAILS)  # without replicates: the points decide


def test_seeds_average_and_widen_the_interval() -> None:
    rows = [r for r in synthetic_study(("base", "sequential")) if r.model in ("base", "sequential-lora-7")]
    one = [dataclasses.replace(r, seed=0) if r.model != "base" else r for r in rows]
    spread = [dataclasses.replace(r, seed=1, value=r.value + 0.1) for r in rows if r.model != "base"]
    column = ("new", "stance", "accuracy")
    single = Scores.from_rows(one, TASKS, items=items_for(one, 0.05))
    both = Scores.from_rows(one + spread, TASKS, items=items_for(one + spread, 0.05))
    assert both.seeds == 2 and single.seeds == 1
    assert float(both.value("sequential-lora-7", column)) == pytest.approx(
        float(single.value("sequential-lora-7", column)) + 0.05)
    low1, high1 = interval_of(single.value("sequential-lora-7", column))
    low2, high2 = interval_of(both.value("sequential-lora-7", column))
    assert high2 - low2 > high1 - low1  # seed variance on top of the items'


def test_results_and_items_round_trip(tmp_path: Path) -> None:
    rows = [Row("m", "sequential", "lora", 1, "stance", "new", "accuracy", 0.5, 4, "stance", ci_low=0.1,
                ci_high=0.9, seed=2), Row("base", "base", "", None, "ks_a", "old", "acc", 0.25, None, "")]
    write_csv(rows, tmp_path / "results.csv")
    assert read_csv(tmp_path / "results.csv") == rows
    items = {("m", "new", "stance", "accuracy"): {2: [1.0, 0.0, 1.0, 0.0]}, ("base", "old", "ks_a", "acc"):
             {None: [0.0, 0.0, 1.0, 0.0]}}
    write_items(items, tmp_path / "per_example.jsonl")
    assert read_items(tmp_path / "per_example.jsonl") == items


def test_a_similar_check_names_its_margin() -> None:
    rows = synthetic_study(("base", "one-round"))
    scores, runs = _scores_and_runs(rows, 0.05)
    from knowstack.report.claims import evaluate_check

    outcome = evaluate_check(Check("AVnew", _s("one-round/fft"), "~", _s("one-round/lora")), runs, scores)
    assert "margin ±" in outcome.evidence and outcome.verdict in (HOLDS, FAILS, INCONCLUSIVE)
