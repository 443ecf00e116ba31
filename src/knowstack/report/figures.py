"""Figures that compare methods (PNG, matplotlib): analogs of the paper's Figures 1-4 and R heat maps."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from knowstack.report.tables import Column, Scores, column_label  # noqa: E402

# The paper's colours: FFT red-ish, LoRA blue-ish, base grey.
COLOURS = {"base": "#9e9e9e", "fft": "#d9544d", "lora": "#3b75af", "fft-1r": "#f2a39e", "lora-1r": "#9cc3e6"}


def _save(fig: plt.Figure, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _colour(series_name: str) -> str | None:
    words = series_name.lower().split()
    key = words[0] + ("-1r" if "one-round" in words else "")
    return COLOURS.get(key)


def grouped_bars(groups: Sequence[str], series: dict[str, list[float | None]], title: str, ylabel: str,
                 path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) + 2), 3.6))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else v for v in values]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name,
               color=_colour(name))
    ax.set_xticks(x, groups, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=min(4, len(series)))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present and len(present) == len(values) else None


def one_round_new(scores: Scores, path: Path) -> Path | None:
    by_task: dict[str, dict[str, str]] = {}
    for finetune in ("fft", "lora"):
        for row in scores.models_where("one-round", finetune):
            by_task.setdefault(row.trained_on, {})[finetune] = row.model
    if not by_task:
        return None
    cols = scores.new_columns
    series: dict[str, list[float | None]] = {"base": [scores.value("base", c) for c in cols]}
    for finetune in ("fft", "lora"):
        series[finetune.upper() if finetune == "fft" else "LoRA"] = [
            scores.value(by_task.get(c[1], {}).get(finetune, ""), c) for c in cols]
    labels = [column_label(c, cols) for c in cols] + ["average"]
    series = {k: v + [_mean(v)] for k, v in series.items()}
    return grouped_bars(labels, series, "One-round training: new knowledge per task (Fig. 1)", "score", path)


def old_knowledge_bars(scores: Scores, models: dict[str, list[str]], title: str, path: Path) -> Path | None:
    """Old-knowledge scores per task; each series averages the listed models (one-round: all of them)."""
    if not any(models.values()):
        return None
    cols = scores.old_columns
    series = {"base": [scores.value("base", c) for c in cols]}
    for name, names in models.items():
        if names:
            series[name] = [_mean([scores.value(m, c) for m in names]) for c in cols]
    labels = [c[1] for c in cols] + ["AVE"]
    series = {k: v + [_mean(v)] for k, v in series.items()}
    return grouped_bars(labels, series, title, "accuracy", path)


def sequential_new(scores: Scores, path: Path) -> Path | None:
    finals = {f: max(scores.models_where("sequential", f), key=lambda r: r.stage or 0).model
              for f in ("fft", "lora") if scores.models_where("sequential", f)}
    if not finals:
        return None
    cols = scores.new_columns
    series: dict[str, list[float | None]] = {"base": [scores.value("base", c) for c in cols]}
    for finetune, model in finals.items():
        series[finetune.upper() if finetune == "fft" else "LoRA"] = [scores.value(model, c) for c in cols]
    one_round = {f: {r.trained_on: r.model for r in scores.models_where("one-round", f)} for f in ("fft", "lora")}
    for finetune, models in one_round.items():
        if models:
            name = f"{'FFT' if finetune == 'fft' else 'LoRA'} one-round"
            series[name] = [scores.value(models.get(c[1], ""), c) for c in cols]
    labels = [column_label(c, cols) for c in cols] + ["average"]
    series = {k: v + [_mean(v)] for k, v in series.items()}
    return grouped_bars(labels, series, "Sequential training: new knowledge after the last round (Fig. 4)",
                        "score", path)


def r_matrix(scores: Scores, finetune: str, path: Path) -> Path | None:
    stages = sorted(scores.models_where("sequential", finetune), key=lambda r: r.stage or 0)
    if not stages:
        return None
    cols: list[Column] = scores.new_columns
    matrix = np.array([[np.nan if (v := scores.value(r.model, c)) is None else v for c in cols] for r in stages])
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2, 0.5 * len(stages) + 1.5))
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=max(1e-9, float(np.nanmax(matrix))))
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white", fontsize=7)
    ax.set_xticks(range(len(cols)), [column_label(c, cols) for c in cols], rotation=30, ha="right")
    ax.set_yticks(range(len(stages)), [f"after {r.stage} ({r.trained_on})" for r in stages])
    ax.set_title(f"Sequential {'FFT' if finetune == 'fft' else 'LoRA'}: R[stage][task]")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def write_figures(scores: Scores, out: Path) -> dict[str, Path]:
    """Every figure the results allow; returns {caption: path} for the report to link."""
    figures = Path(out) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    one_round = {("FFT" if f == "fft" else "LoRA"): [r.model for r in scores.models_where("one-round", f)]
                 for f in ("fft", "lora")}
    final = {("FFT" if f == "fft" else "LoRA"): [max(rows, key=lambda r: r.stage or 0).model]
             for f in ("fft", "lora") if (rows := scores.models_where("sequential", f))}
    made = {
        "One-round new knowledge, FFT vs LoRA (Fig. 1)": one_round_new(scores, figures / "fig1_one_round_new.png"),
        "Old knowledge averaged over the one-round models (Fig. 2)": old_knowledge_bars(
            scores, one_round, "One-round training: old knowledge, mean over models (Fig. 2)",
            figures / "fig2_one_round_old.png"),
        "Old knowledge after the last sequential round (Fig. 3)": old_knowledge_bars(
            scores, final, "Sequential training: old knowledge after the last round (Fig. 3)",
            figures / "fig3_sequential_old.png"),
        "New knowledge after the last sequential round, one-round as upper bound (Fig. 4)": sequential_new(
            scores, figures / "fig4_sequential_new.png"),
        "Sequential FFT: R[stage][task]": r_matrix(scores, "fft", figures / "r_matrix_fft.png"),
        "Sequential LoRA: R[stage][task]": r_matrix(scores, "lora", figures / "r_matrix_lora.png"),
    }
    return {caption: path for caption, path in made.items() if path is not None}
