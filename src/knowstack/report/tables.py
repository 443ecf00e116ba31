"""The study's numbers as tables: score lookups, gain from base, BWT and the AVE/AVnew/AVall averages.

Everything is computed from per-task results rows, never copied from anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import mean

from knowstack.study.results import Row

Column = tuple[str, str, str]  # (kind, task, metric)


@dataclass
class Scores:
    """Results rows indexed by model, with the new and old columns in study order."""

    rows: list[Row]
    new_columns: list[Column]
    old_columns: list[Column]

    @classmethod
    def from_rows(cls, rows: list[Row], task_order: Sequence[str], old_metric: str = "acc") -> Scores:
        rank = {task: i for i, task in enumerate(task_order)}
        new = _unique((r.kind, r.task, r.metric) for r in rows if r.kind == "new")
        new.sort(key=lambda c: rank.get(c[1], len(rank)))
        old = sorted(_unique((r.kind, r.task, r.metric) for r in rows if r.kind == "old" and r.metric == old_metric))
        return cls(rows, new, old)

    def __post_init__(self) -> None:
        self._index = {(r.model, r.kind, r.task, r.metric): r.value for r in self.rows}
        self._models = _unique(r.model for r in self.rows)

    @property
    def models(self) -> list[str]:
        return self._models

    def value(self, model: str, column: Column) -> float | None:
        return self._index.get((model, *column))

    def models_where(self, method: str, finetune: str) -> list[Row]:
        """One row per model of a method (its first row), in plan order."""
        seen: dict[str, Row] = {}
        for row in self.rows:
            if row.method == method and row.finetune == finetune:
                seen.setdefault(row.model, row)
        return list(seen.values())

    def averages(self, model: str) -> dict[str, float | None]:
        old = [self.value(model, c) for c in self.old_columns]
        new = [self.value(model, c) for c in self.new_columns]
        return {"AVE": _mean(old), "AVnew": _mean(new), "AVall": _mean(old + new)}


def column_label(column: Column, columns: Sequence[Column]) -> str:
    _, task, metric = column
    shared = sum(1 for c in columns if c[1] == task) > 1
    return f"{task} ({metric})" if shared else task


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))


def _mean(values: Sequence[float | None]) -> float | None:
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
