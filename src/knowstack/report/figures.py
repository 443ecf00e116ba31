"""The report's figures (PNG, matplotlib), drawn from the report's own tables so a figure and its table
can never disagree: grouped bars (analogs of the paper's Figures 1-10) and R[stage][task] heat maps."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from knowstack.atomic import honour_umask  # noqa: E402
from knowstack.report.tables import GAIN_SUFFIX, Table, TableRow  # noqa: E402
from knowstack.stats import interval_of  # noqa: E402

# The paper's colour convention: FFT red, LoRA blue, base grey. A figure with several FFT (or LoRA)
# series walks down that finetune's shades; one-round models, the upper bound, take the lightest.
BASE_COLOUR = "#9e9e9e"
SHADES = {
    "fft": ["#d9544d", "#a8322c", "#f08a5d", "#7f1f1a", "#e8706a", "#c0504d", "#5c1511"],
    "lora": ["#3b75af", "#1f4e79", "#5fa8d3", "#0b2f4f", "#7aa6d6", "#2e5f8a", "#16384f"],
}
ONE_ROUND = {"fft": "#f2a39e", "lora": "#9cc3e6"}
OTHER_COLOUR = "#6a9f58"
# Methods are told apart within a finetune's colour by a hatch pattern.
HATCHES = {"olora": "//", "merge": "..", "moe": "xx", "replay": "\\\\", "joint": "--"}
MARKERS = {"base": "s", "one-round": "D", "sequential": "o", "olora": "^", "merge": "P", "moe": "*", "replay": "v",
           "joint": "X"}


@dataclass
class FigureSpec:
    """One figure to draw from `table`: its rows of `unit` as series (bars) or as a matrix (heatmap)."""

    key: str  # the PNG's file stem
    caption: str
    title: str
    table: Table
    ylabel: str
    kind: str = "bars"  # "bars" | "heatmap" | "scatter" (columns: x then y) | "frontier" (x, y, front mark)
    unit: str = "score"
    columns: list[str] | None = None  # header names to plot; None: all
    xlabel: str = "task (each with its own metric); average"
    path: Path | None = None  # set once drawn
    budget: float | None = None  # search: the old-knowledge loss budget, drawn as a line


def save_figure(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    honour_umask(Path(tmp))
    os.replace(tmp, path)
    return path


def series_style(rows: list[TableRow]) -> list[dict]:
    """Colour and hatch per row, from its run key `method/finetune/...` (the base's key is 'base')."""
    used = {"fft": 0, "lora": 0}
    # One-round models are drawn light only beside other runs of their finetune (as upper bounds);
    # alone (Fig. 1, 2) they are the finetune's main colour.
    others = {_finetune(r.key) for r in rows if not r.key.startswith(("one-round", "base"))}
    styles = []
    for row in rows:
        method, finetune = row.key.partition("/")[0], _finetune(row.key)
        if method == "base":
            styles.append({"color": BASE_COLOUR})
        elif method == "one-round" and finetune in others:
            styles.append({"color": ONE_ROUND[finetune]})
        elif finetune in SHADES:
            shades = SHADES[finetune]
            styles.append({"color": shades[used[finetune] % len(shades)], "hatch": HATCHES.get(method, "")})
            used[finetune] += 1
        else:
            styles.append({"color": OTHER_COLOUR, "hatch": HATCHES.get(method, "")})
    return styles


def _finetune(key: str) -> str:
    return key.partition("/")[2].split("/")[0]


def _column_indexes(spec: FigureSpec) -> list[int]:
    names = spec.table.header[1:]
    wanted = spec.columns if spec.columns is not None else names
    return [i for i, name in enumerate(names) if name in wanted]


def _number(cell: object) -> float:
    return float(cell) if isinstance(cell, float | int) else math.nan


def _errors(cells: list[object]) -> np.ndarray | None:
    """(2, n) distances from each value down and up to its 95% interval, for matplotlib's xerr/yerr; None where
    no cell has an interval (a cell without one gets no bar)."""
    intervals = [interval_of(c) for c in cells]
    if not any(intervals):
        return None
    values = [_number(c) for c in cells]
    return np.array([[max(0.0, v - ci[0]) if ci else 0.0 for v, ci in zip(values, intervals, strict=True)],
                     [max(0.0, ci[1] - v) if ci else 0.0 for v, ci in zip(values, intervals, strict=True)]])


def plotted_rows(spec: FigureSpec) -> list[TableRow]:
    columns = _column_indexes(spec)
    return [r for r in spec.table.rows if all(r.units[i] == spec.unit for i in columns)]


def legend_label(row: TableRow) -> str:
    """A gain row's label without the suffix the axis already says."""
    return row.label.removesuffix(GAIN_SUFFIX)


def _has_numbers(rows: list[TableRow], columns: list[int]) -> bool:
    return any(isinstance(r.cells[j], float | int) for r in rows for j in columns)


def grouped_bars(spec: FigureSpec, path: Path) -> Path | None:
    rows, columns = plotted_rows(spec), _column_indexes(spec)
    if not _has_numbers(rows, columns):  # an empty chart would only say less than the table
        return None
    groups = [spec.table.header[1 + i] for i in columns]
    fig, ax = plt.subplots(figsize=(min(14, max(6.5, 0.3 * len(groups) * len(rows) + 2.5)), 4.0))
    width = 0.8 / len(rows)
    x = np.arange(len(groups))
    for i, (row, style) in enumerate(zip(rows, series_style(rows), strict=True)):
        heights = [_number(row.cells[j]) for j in columns]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, heights, width, label=legend_label(row), edgecolor="white",
               linewidth=0.4, yerr=_errors([row.cells[j] for j in columns]), error_kw=ERROR_STYLE, **style)
    ax.set_xticks(x, groups, rotation=20, ha="right")
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    ax.set_title(spec.title)
    if spec.unit == "percent":
        ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    # Beside the axes, not below: below it would collide with rotated tick labels.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, path)


def heatmap(spec: FigureSpec, path: Path) -> Path | None:
    rows, columns = plotted_rows(spec), _column_indexes(spec)
    if not _has_numbers(rows, columns):
        return None
    matrix = np.array([[_number(r.cells[j]) for j in columns] for r in rows])
    fig, ax = plt.subplots(figsize=(0.95 * len(columns) + 3, 0.45 * len(rows) + 1.8))
    top = float(np.nanmax(matrix)) if np.isfinite(matrix).any() else 1.0
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=max(1e-9, top), aspect="auto")
    for (i, j), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            # Dark text on the bright end of viridis, light text on the dark end; the 95% interval below the value.
            ci = interval_of(rows[i].cells[columns[j]])
            text = f"{value:.2f}" + (f"\n[{ci[0]:.2f},{ci[1]:.2f}]" if ci else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7 if ci is None else 5.5,
                    color="black" if value > 0.6 * top else "white")
    ax.set_xticks(range(len(columns)), [spec.table.header[1 + j] for j in columns], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [r.label for r in rows])
    ax.set_xlabel("task (evaluated)")
    ax.set_ylabel("model after stage (trained on)")
    ax.set_title(spec.title)
    fig.colorbar(image, ax=ax, shrink=0.85, label=spec.ylabel)
    return save_figure(fig, path)


def scatter(spec: FigureSpec, path: Path) -> Path | None:
    """One point per row at (first column, second column): the learn/forget trade-off at a glance."""
    columns = _column_indexes(spec)
    rows = [r for r in plotted_rows(spec) if all(isinstance(r.cells[j], float | int) for j in columns)]
    if len(columns) != 2 or len(rows) < 2:  # the base alone is no comparison
        return None
    fig, ax = plt.subplots(figsize=(8.5, 5.0))
    for row, style in zip(rows, series_style(rows), strict=True):
        x, y = row.cells[columns[0]], row.cells[columns[1]]
        ax.scatter(_number(x), _number(y), s=70, label=row.label,
                   color=style["color"], marker=MARKERS.get(row.key.partition("/")[0], "o"), edgecolors="black",
                   linewidths=0.5, zorder=3)
        _interval_bars(ax, [x], [y], style["color"])
    return _finish_plane(fig, ax, spec, path)


ERROR_STYLE = {"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"}


def _interval_bars(ax: plt.Axes, xs: list[object], ys: list[object], colour: str) -> None:
    """Each point's 95% intervals on both axes, where its cells have them."""
    xerr, yerr = _errors(xs), _errors(ys)
    if xerr is not None or yerr is not None:
        ax.errorbar([_number(x) for x in xs], [_number(y) for y in ys], xerr=xerr, yerr=yerr, fmt="none",
                    ecolor=colour, elinewidth=0.8, capsize=2, alpha=0.7, zorder=2)


def _finish_plane(fig: plt.Figure, ax: plt.Axes, spec: FigureSpec, path: Path) -> Path:
    """Axes through the origin (the base), labels, grid and a legend beside the plot; saved."""
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    ax.set_title(spec.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, path)


def family_style(families: list[str]) -> dict[str, dict]:
    """Colour (the paper's, walking down a finetune's shades) and marker per method family 'method/finetune/..'."""
    used = {"fft": 0, "lora": 0}
    styles = {}
    for family in families:
        method, finetune = family.partition("/")[0], _finetune(family)
        if finetune in SHADES:
            colour = SHADES[finetune][used[finetune] % len(SHADES[finetune])]
            used[finetune] += 1
        else:
            colour = OTHER_COLOUR
        styles[family] = {"color": colour, "marker": MARKERS.get(method, "o")}
    return styles


def search_trace(spec: FigureSpec, path: Path) -> Path | None:
    """A search's trials in order (columns: trial, eval score, old loss): above, the old-knowledge loss with the
    budget as a dashed line; below, the eval score, filled where the trial is within the budget. The trial is the
    rows' label column ('4', or '4 (chosen)'): x is its number."""
    names = spec.table.header[1:]
    y_col, loss_col = (names.index(c) for c in (spec.columns or [])[1:])
    rows = spec.table.rows
    if not rows:
        return None
    xs = [float(r.label.split()[0]) for r in rows]
    within = [spec.budget is None or _number(r.cells[loss_col]) <= spec.budget for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8.0, 5.5), sharex=True)
    top.plot(xs, [_number(r.cells[loss_col]) for r in rows], color=OTHER_COLOUR, linewidth=0.8, zorder=2)
    if spec.budget is not None:
        top.axhline(spec.budget, color="black", linestyle="--", linewidth=1.0, label=f"budget {spec.budget:g}%")
        top.legend(fontsize=8, frameon=False)
    top.set_ylabel("old held-out loss (%)")
    top.set_title(spec.title)
    ys = [_number(r.cells[y_col]) for r in rows]
    colours = ["black" if inside else "white" for inside in within]
    for axis, values in ((top, [_number(r.cells[loss_col]) for r in rows]), (bottom, ys)):
        axis.scatter(xs, values, s=40, c=colours, edgecolors="black", zorder=3)
        axis.grid(alpha=0.3)
    bottom.set_ylabel(spec.ylabel + " (filled: within budget)")
    bottom.set_xlabel(spec.xlabel)
    return save_figure(fig, path)


def frontier(spec: FigureSpec, path: Path) -> Path | None:
    """Each method's points (rows keyed by method family) at (x, y) and a line from the base (0, 0) through the
    points marked as on its front, in order of y (the new-knowledge gain)."""
    names = spec.table.header[1:]
    x_col, y_col, front_col = (names.index(c) for c in spec.columns or [])
    rows = [r for r in spec.table.rows if isinstance(r.cells[x_col], float | int)
            and isinstance(r.cells[y_col], float | int)]
    if not rows:
        return None
    styles = family_style(list(dict.fromkeys(r.key for r in rows)))
    fig, ax = plt.subplots(figsize=(9.0, 5.5))
    for family, style in styles.items():
        members = [r for r in rows if r.key == family]
        xs, ys = [_number(r.cells[x_col]) for r in members], [_number(r.cells[y_col]) for r in members]
        ax.scatter(xs, ys, s=55, color=style["color"], marker=style["marker"], edgecolors="black", linewidths=0.5,
                   zorder=3, label=family)
        _interval_bars(ax, [r.cells[x_col] for r in members], [r.cells[y_col] for r in members], style["color"])
        front = sorted((_number(r.cells[y_col]), _number(r.cells[x_col])) for r in members
                       if r.cells[front_col] and _number(r.cells[y_col]) > 0)
        if front:
            ax.plot([0.0, *(x for _, x in front)], [0.0, *(y for y, _ in front)], color=style["color"], linewidth=1.4,
                    zorder=2)
    ax.scatter([0], [0], s=70, color=BASE_COLOUR, marker=MARKERS["base"], edgecolors="black", zorder=4, label="base")
    return _finish_plane(fig, ax, spec, path)


def draw(spec: FigureSpec, folder: Path) -> Path | None:
    """Draws the figure into `folder`/<key>.png; None (and nothing written) when it has no data."""
    path = Path(folder) / f"{spec.key}.png"
    spec.path = {"heatmap": heatmap, "scatter": scatter, "frontier": frontier,
                 "search": search_trace}.get(spec.kind, grouped_bars)(spec, path)
    return spec.path
