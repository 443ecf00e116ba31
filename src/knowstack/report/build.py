"""`knowstack report`: from results rows (nothing recomputed from models) to report.html, report.md,
figures/*.png and tables/*.csv|md in the study dir.

The report reads results only (results.py's types and files: results.csv, per_example.jsonl, costs.csv,
study.json), never a study's plan or artifacts: the study writes what the report needs (study/results.py)."""

from __future__ import annotations

from pathlib import Path

from knowstack.atomic import atomic_write_text
from knowstack.config import OldMetric, describe_old_metric
from knowstack.errors import KnowstackError
from knowstack.report.advice import advice_notes, advice_text, advise
from knowstack.report.claims import BASELINES, evaluate_claims, evaluate_matched_claims
from knowstack.report.coverage import coverage
from knowstack.report.figures import FigureSpec, draw
from knowstack.report.frontier import TradeOff, gained, trade_offs
from knowstack.report.html import render_html
from knowstack.report.markdown import render_markdown
from knowstack.report.run_tables import Context
from knowstack.report.runs import find_runs
from knowstack.report.sections import Section, build_sections
from knowstack.report.tables import Scores, Table
from knowstack.results import (
    COSTS_CSV,
    PER_EXAMPLE,
    STUDY_INFO,
    Cost,
    Items,
    Row,
    StudyInfo,
    read_costs_csv,
    read_csv,
    read_items,
    read_study_info,
)


def measured_points(rows: list[Row], task_order: list[str], old_metric: OldMetric = "acc",
                    items: Items | None = None) -> tuple[Scores, list[TradeOff]]:
    """The scores, and every run at every setting measured as a learn/forget point (what advice reads)."""
    scores = Scores.from_rows(rows, task_order, old_metric, items)
    return scores, trade_offs(scores, find_runs(scores), len(task_order))


def study_advice(rows: list[Row], task_order: list[str], max_old_loss: float, setting: str,
                 old_metric: OldMetric = "acc", items: Items | None = None) -> str:
    """`knowstack advise DIR`'s text: the advice, what it left out and why, from the rows the report reads."""
    scores, points = measured_points(rows, task_order, old_metric, items)
    notes = advice_notes(scores, find_runs(scores), len(task_order), setting)
    return advice_text(advise(points, max_old_loss, setting), scores, notes)


def build_report(rows: list[Row], *, title: str, task_order: list[str], old_metric: OldMetric = "acc",
                 penalties: dict[str, dict] | None = None, planned: list[Row] | None = None,
                 items: Items | None = None, costs: list[Cost] | None = None,
                 searches: dict[str, dict] | None = None) -> list[Section]:
    """The report's section tree; figures are specified but not drawn yet. items: per-item scores, for intervals;
    costs: what each model cost to make (costs.csv), where measured; searches: each search's record."""
    scores = Scores.from_rows(rows, task_order, old_metric, items)
    every = find_runs(scores)
    runs = [r for r in every if not r.point]  # each method at its own setting: compared at equal settings
    points = trade_offs(scores, every, len(task_order))
    swept = len(runs) < len(every)
    ctx = Context(scores=scores, runs=runs, rounds=len(task_order), old_metric=describe_old_metric(old_metric),
                  penalties=penalties or {}, verdicts=evaluate_claims(scores, runs),
                  coverage=coverage(every, planned, task_order), points=points,
                  matched=evaluate_matched_claims(scores, gained(points)) if swept else None, costs=costs or [],
                  advice_notes=advice_notes(scores, every, len(task_order)), searches=searches or {},
                  baselines=evaluate_claims(scores, runs, BASELINES))
    return build_sections(ctx, title)


def render_report(rows: list[Row], *, title: str, task_order: list[str], old_metric: OldMetric = "acc",
                  penalties: dict[str, dict] | None = None) -> str:
    """report.md's text without drawing figures (quick, for tests and scripts)."""
    sections = build_report(rows, title=title, task_order=task_order, old_metric=old_metric, penalties=penalties)
    return render_markdown(sections, title=title, out=Path("."))


def _blocks(sections: list[Section], kind: type) -> list:
    return [b for s in sections for b in [s, *s.walk()] if isinstance(b, kind)]


def write_tables(sections: list[Section], out: Path) -> list[Path]:
    """Every table as CSV (full precision) and markdown, under out/tables/<key>.*"""
    written = []
    for table in _blocks(sections, Table):
        atomic_write_text(out / "tables" / f"{table.key}.csv", table.to_csv())
        atomic_write_text(out / "tables" / f"{table.key}.md", f"{table.caption}\n\n{table.to_markdown()}\n")
        written.append(out / "tables" / f"{table.key}.csv")
    return written


def draw_figures(sections: list[Section], out: Path) -> list[Path]:
    """Draws every figure that has data; removes PNGs a previous report drew and this one does not."""
    folder = out / "figures"
    drawn = [p for spec in _blocks(sections, FigureSpec) if (p := draw(spec, folder)) is not None]
    for stale in set(folder.glob("*.png")) - set(drawn):
        stale.unlink()
    return drawn


def write_report(rows: list[Row], out: Path, *, title: str, task_order: list[str], old_metric: OldMetric = "acc",
                 penalties: dict[str, dict] | None = None, planned: list[Row] | None = None,
                 items: Items | None = None, costs: list[Cost] | None = None,
                 searches: dict[str, dict] | None = None) -> Path:
    """Writes the whole report into `out` and returns the path of report.html."""
    out = Path(out)
    sections = build_report(rows, title=title, task_order=task_order, old_metric=old_metric, penalties=penalties,
                            planned=planned, items=items, costs=costs, searches=searches)
    draw_figures(sections, out)
    write_tables(sections, out)
    atomic_write_text(out / "report.md", render_markdown(sections, title=title, out=out))
    atomic_write_text(out / "report.html", render_html(sections, title=title))
    return out / "report.html"


def write_study_report(out: Path, rows: list[Row], info: StudyInfo, *, items: Items | None = None,
                       costs: list[Cost] | None = None) -> Path:
    """The report of a study dir from its results: the rows, and what the study wrote of its plan (study.json:
    title, task order, old metric, planned evaluations, O-LoRA's penalties); items and costs default to the
    dir's per_example.jsonl and costs.csv."""
    return write_report(rows, out, title=info.title, task_order=info.task_order, old_metric=info.old_metric,
                        penalties=info.penalties, planned=info.planned, searches=info.searches,
                        items=read_items(out / PER_EXAMPLE) if items is None else items,
                        costs=read_costs_csv(out / COSTS_CSV) if costs is None else costs)


def read_study_results(out: Path) -> tuple[list[Row], StudyInfo]:
    """A finished study dir's rows and StudyInfo, from its results files alone (results.csv, study.json)."""
    info = read_study_info(out / STUDY_INFO)
    if info is None or not (out / "results.csv").is_file():
        raise KnowstackError("no results of a finished study here (results.csv and study.json): run or resume "
                             "the study", path=out)
    return read_csv(out / "results.csv"), info
