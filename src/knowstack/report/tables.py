"""The study's numbers as tables: score lookups, gain from base, BWT, the AVE/AVnew/AVall averages, and
a table model that every report format (markdown, CSV, HTML, figures) renders from.

Everything is computed from per-task results rows, never copied from anywhere.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import mean

from knowstack.config import OldMetric, old_metric_of
from knowstack.study.results import Row

Column = tuple[str, str, str]  # (kind, task, metric)
Values = dict[Column, "float | None"]
Cell = float | str | None  # a number, a literal (e.g. "—" where a value cannot exist), or missing


@dataclass
class Scores:
    """Results rows indexed by model, with the new and old columns in study order."""

    rows: list[Row]
    new_columns: list[Column]
    old_columns: list[Column]

    @classmethod
    def from_rows(cls, rows: list[Row], task_order: Sequence[str], old_metric: OldMetric = "acc") -> Scores:
        """old_metric: the metric reported for every old task, or a mapping task -> metric (acc where unnamed)."""
        rank = {task: i for i, task in enumerate(task_order)}
        new = _unique((r.kind, r.task, r.metric) for r in rows if r.kind == "new")
        new.sort(key=lambda c: rank.get(c[1], len(rank)))
        old = sorted(_unique((r.kind, r.task, r.metric) for r in rows if r.kind == "old"
                                and r.metric == old_metric_of(old_metric, r.task)))
        return cls(rows, new, old)

    def __post_init__(self) -> None:
        self._index = {(r.model, r.kind, r.task, r.metric): r.value for r in self.rows}
        self._models = _unique(r.model for r in self.rows)

    @property
    def models(self) -> list[str]:
        return self._models

    @property
    def columns(self) -> list[Column]:
        return self.new_columns + self.old_columns

    def value(self, model: str, column: Column) -> float | None:
        return self._index.get((model, *column))

    def values(self, model: str) -> Values:
        return {c: self.value(model, c) for c in self.columns}

    def models_where(self, method: str, finetune: str) -> list[Row]:
        """One row per model of a method (its first row), in plan order."""
        seen: dict[str, Row] = {}
        for row in self.rows:
            if row.method == method and row.finetune == finetune:
                seen.setdefault(row.model, row)
        return list(seen.values())

    def averages(self, model: str) -> dict[str, float | None]:
        return self.averages_of(self.values(model))

    def averages_of(self, values: Values) -> dict[str, float | None]:
        """AVE over old columns, AVnew over new columns, AVall over both; missing if any column is."""
        old = [values.get(c) for c in self.old_columns]
        new = [values.get(c) for c in self.new_columns]
        return {"AVE": mean_or_none(old), "AVnew": mean_or_none(new), "AVall": mean_or_none(old + new)}


AVERAGES = ("AVE", "AVnew", "AVall")
GAIN_SUFFIX = ": gain from base"  # how a run's gain row is labelled beside its score row


def column_label(column: Column, columns: Sequence[Column]) -> str:
    _, task, metric = column
    shared = sum(1 for c in columns if c[1] == task) > 1
    return f"{task} ({metric})" if shared else task


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean, or None when any value is missing: an average over fewer columns would mislead."""
    present = [v for v in values if v is not None]
    return mean(present) if present and len(present) == len(values) else None


def percent_change(before: float | None, after: float | None) -> float | None:
    """Percent change from `before` to `after`; undefined when `before` is zero or missing."""
    if before is None or after is None or before == 0:
        return None
    return (after - before) / abs(before) * 100.0


def bwt(own_round: float | None, final: float | None) -> float | None:
    """Backward transfer of a task: percent change from right after its own round to after the last."""
    return percent_change(own_round, final)


def fmt_score(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def fmt_percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.0f}%"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class TableRow:
    """One labelled row; `unit` says how its numbers read: 0..1 scores, percent changes, or text
    (one unit for the row, or one per cell)."""

    label: str
    cells: list[Cell]
    unit: str | list[str] = "score"  # "score" | "percent" | "text"
    key: str = ""  # the run (method/finetune/variant) or model the row is about: colours, HTML ids, tests

    @property
    def units(self) -> list[str]:
        return self.unit if isinstance(self.unit, list) else [self.unit] * len(self.cells)

    def formatted(self) -> list[str]:
        return [format_cell(c, u) for c, u in zip(self.cells, self.units, strict=True)]


def format_cell(cell: Cell, unit: str) -> str:
    if isinstance(cell, str):
        return cell
    if unit == "percent":
        return fmt_percent(cell)
    if unit == "text":
        return "" if cell is None else str(cell)
    return fmt_score(cell)


@dataclass
class Table:
    """A report table: `key` names its CSV file, `caption` says what it shows and which paper item it mirrors."""

    key: str
    caption: str
    header: list[str]
    rows: list[TableRow] = field(default_factory=list)

    def row(self, label: str) -> TableRow | None:
        return next((r for r in self.rows if r.label == label), None)

    def to_markdown(self) -> str:
        return markdown_table(self.header, ([r.label, *r.formatted()] for r in self.rows))

    def to_csv(self) -> str:
        """Numbers at full precision (percent rows as percent numbers); text cells as written."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*self.header, "unit"])
        for row in self.rows:
            cells = ["" if c is None else (c if isinstance(c, str) else repr(float(c))) for c in row.cells]
            writer.writerow([row.label, *cells, row.unit if isinstance(row.unit, str) else "mixed"])
        return buffer.getvalue()
