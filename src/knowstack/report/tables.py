"""The study's numbers as tables: score lookups, gain from base, BWT, the AVE/AVnew/AVall averages, and
a table model that every report format (markdown, CSV, HTML, figures) renders from.

Everything is computed from per-task results rows, never copied from anywhere.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from knowstack.config import OldMetric, old_metric_of
from knowstack.results import ItemKey, Row
from knowstack.stats import Estimate, column_estimate, interval_of, mean_of

Column = tuple[str, str, str]  # (kind, task, metric)
Values = dict[Column, "float | None"]
Cell = float | str | None  # a number, a literal (e.g. "—" where a value cannot exist), or missing


@dataclass
class Scores:
    """Results rows indexed by model, with the new and old columns in study order."""

    rows: list[Row]
    new_columns: list[Column]
    old_columns: list[Column]
    items: dict[ItemKey, dict[int | None, list[float]]] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: list[Row], task_order: Sequence[str], old_metric: OldMetric = "acc",
                  items: dict[ItemKey, dict[int | None, list[float]]] | None = None) -> Scores:
        """old_metric: the metric reported for every old task, or a mapping task -> metric (acc where
        unnamed). items: per-item scores (model, kind, task, metric) -> {seed: scores}; with them every value carries
        its bootstrap replicates (stats.py) and every number computed from it an interval."""
        rank = {task: i for i, task in enumerate(task_order)}
        new = _unique((r.kind, r.task, r.metric) for r in rows if r.kind == "new")
        new.sort(key=lambda c: rank.get(c[1], len(rank)))
        old = sorted(_unique((r.kind, r.task, r.metric) for r in rows if r.kind == "old"
                            and r.metric == old_metric_of(old_metric, r.task)))
        return cls(rows, new, old, items or {})

    def __post_init__(self) -> None:
        # A model repeated over seeds has one row per seed: its value is their mean.
        by_key: dict[ItemKey, list[float]] = {}
        for r in self.rows:
            by_key.setdefault((r.model, r.kind, r.task, r.metric), []).append(r.value)
        self._index = {key: self._estimate(key, values) for key, values in by_key.items()}
        self._models = _unique(r.model for r in self.rows)
        self.seeds = max((len({r.seed for r in self.rows if r.model == m}) for m in self._models), default=1)

    def _estimate(self, key: ItemKey, values: list[float]) -> float:
        by_seed = self.items.get(key)
        if not by_seed or len(by_seed) != len(values) or len({len(s) for s in by_seed.values()}) != 1:
            return sum(values) / len(values)
        # Items are resampled per task: the columns of one task (math's two) share their indices.
        return column_estimate([by_seed[seed] for seed in sorted(by_seed, key=lambda s: (s is None, s))],
                               f"{key[1]}/{key[2]}")

    @property
    def with_intervals(self) -> bool:
        return any(isinstance(v, Estimate) and v.draws is not None for v in self._index.values())

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
    return mean_of(present) if present and len(present) == len(values) else None


def percent_change(before: float | None, after: float | None) -> float | None:
    """Percent change from `before` to `after`; undefined when `before` is zero or missing."""
    if before is None or after is None or before == 0:
        return None
    return (after - before) / abs(before) * 100.0


def bwt(own_round: float | None, final: float | None) -> float | None:
    """Backward transfer of a task: percent change from right after its own round to after the last."""
    return percent_change(own_round, final)


def fmt_score(value: float | None) -> str:
    if value is None:
        return "—"
    ci = interval_of(value)
    return f"{value:.4f}" if ci is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def fmt_delta(value: float | None) -> str:
    """A signed difference of scores (FWT, forgetting), in score units."""
    if value is None:
        return "n/a"
    ci = interval_of(value)
    return f"{value:+.4f}" if ci is None else f"{value:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def fmt_percent(value: float | None) -> str:
    if value is None:
        return "n/a"
    ci = interval_of(value)
    return f"{value:+.0f}%" if ci is None else f"{value:+.0f}% [{ci[0]:+.0f}, {ci[1]:+.0f}]"


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
    unit: str | list[str] = "score"  # "score" | "percent" | "delta" (a difference of scores) | "text"
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
    if unit == "delta":
        return fmt_delta(cell)
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
        """Numbers at full precision (percent rows as percent numbers); text cells as written. Where numbers carry
        intervals, each numeric column's 95% interval follows in '<column> ci_low' and '<column> ci_high'."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        ranged = [i for i in range(len(self.header) - 1) if any(interval_of(r.cells[i]) for r in self.rows)]
        writer.writerow([*self.header, "unit", *(f"{self.header[1 + i]} {end}" for i in ranged
                                                for end in ("ci_low", "ci_high"))])
        for row in self.rows:
            cells = ["" if c is None else (c if isinstance(c, str) else repr(float(c))) for c in row.cells]
            bounds = [("" if (ci := interval_of(row.cells[i])) is None else repr(ci[end])) for i in ranged
                      for end in (0, 1)]
            writer.writerow([row.label, *cells, row.unit if isinstance(row.unit, str) else "mixed", *bounds])
        return buffer.getvalue()
