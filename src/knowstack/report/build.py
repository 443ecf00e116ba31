"""`knowstack report`: from results rows (nothing recomputed from models) to report.html, report.md,
figures/*.png and tables/*.csv|md in the study dir."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from knowstack.atomic import atomic_write_text
from knowstack.config import OldMetric, describe_old_metric
from knowstack.report.advice import advice_notes, advice_text, advise
from knowstack.report.claims import evaluate_claims, evaluate_matched_claims
from knowstack.report.coverage import coverage
from knowstack.report.figures import FigureSpec, draw
from knowstack.report.frontier import TradeOff, gained, trade_offs
from knowstack.report.html import render_html
from knowstack.report.markdown import render_markdown
from knowstack.report.run_tables import Context
from knowstack.report.runs import find_runs
from knowstack.report.sections import Section, build_sections
from knowstack.report.tables import Scores, Table
from knowstack.results import COSTS_CSV, PER_EXAMPLE, Cost, ItemKey, Row, read_costs_csv, read_csv, read_items
from knowstack.study.costs import collect_costs
from knowstack.study.plan import Plan
from knowstack.study.results import collect_items, collect_rows, olora_penalties

Items = dict[ItemKey, dict[int | None, list[float]]]


def planned_rows(evaluations: Iterable) -> list[Row]:
    """The plan's evaluations (plan.evaluations) as value-less rows, so the report can say what is missing."""
    return [Row(model=e.model, method=e.method, finetune=e.finetune, stage=e.stage, task="", kind="", metric="",
                value=0.0, n=None, trained_on=e.trained_on) for e in evaluations]


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
                 items: Items | None = None, costs: list[Cost] | None = None) -> list[Section]:
    """The report's section tree; figures are specified but not drawn yet. items: per-item scores, for intervals;
    costs: what each model cost to make (costs.csv), where measured."""
    scores = Scores.from_rows(rows, task_order, old_metric, items)
    every = find_runs(scores)
    runs = [r for r in every if not r.point]  # each method at its own setting: compared at equal settings
    points = trade_offs(scores, every, len(task_order))
    swept = len(runs) < len(every)
    ctx = Context(scores=scores, runs=runs, rounds=len(task_order), old_metric=describe_old_metric(old_metric),
                  penalties=penalties or {}, verdicts=evaluate_claims(scores, runs),
                  coverage=coverage(every, planned, task_order), points=points,
                  matched=evaluate_matched_claims(scores, gained(points)) if swept else None, costs=costs or [],
                  advice_notes=advice_notes(scores, every, len(task_order)))
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
                 items: Items | None = None, costs: list[Cost] | None = None) -> Path:
    """Writes the whole report into `out` and returns the path of report.html."""
    out = Path(out)
    sections = build_report(rows, title=title, task_order=task_order, old_metric=old_metric, penalties=penalties,
                            planned=planned, items=items, costs=costs)
    draw_figures(sections, out)
    write_tables(sections, out)
    atomic_write_text(out / "report.md", render_markdown(sections, title=title, out=out))
    atomic_write_text(out / "report.html", render_html(sections, title=title))
    return out / "report.html"


def study_rows(plan: Plan, out: Path) -> list[Row]:
    """A study dir's results: results.csv, or, while a study is still running (results.csv is written at its
    end), the rows of the evaluations finished so far, read from their result files."""
    csv_path, artifacts = out / "results.csv", out / "artifacts"
    written = read_csv(csv_path) if csv_path.is_file() else []
    live = collect_rows(plan, artifacts) if artifacts.is_dir() else []
    return live if len(live) > len(written) else written


def study_items(plan: Plan, out: Path) -> Items:
    """A study dir's per-item scores: per_example.jsonl (written with results.csv), or the finished evaluations'."""
    written = read_items(out / PER_EXAMPLE)
    live = collect_items(plan, out / "artifacts") if (out / "artifacts").is_dir() else {}
    return live if len(live) > len(written) else written


def study_costs(plan: Plan, out: Path) -> list[Cost]:
    """A study dir's costs: costs.csv (written with results.csv), or the finished steps' while it runs."""
    written = read_costs_csv(out / COSTS_CSV)
    live = collect_costs(plan, out / "artifacts") if (out / "artifacts").is_dir() else []
    return live if len(live) > len(written) else written


def write_study_report(plan: Plan, out: Path, rows: list[Row]) -> Path:
    """The report of a study dir, knowing its plan: what is missing, and O-LoRA's penalties."""
    config = plan.config
    return write_report(rows, out, title=config.name, task_order=plan.task_names,
                        old_metric=config.old_knowledge.metric, penalties=olora_penalties(plan, out / "artifacts"),
                        planned=planned_rows(plan.evaluations), items=study_items(plan, out),
                        costs=study_costs(plan, out))
