"""The registry's versions on the learn/forget plane: what each composed version gained in new knowledge
against what it lost of old knowledge, both relative to the base, released and rejected told apart, with
the latest gate's old-knowledge limit drawn. `knowstack log REG --plot versions.png`. Labels are placed so that
none overlaps another or a marker (report/labels.py), however close the versions lie."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from knowstack.registry.advice import Measured, measured_versions
from knowstack.registry.core import Registry, composed

STATUS_STYLE = {"released": {"color": "#3b7d3b", "marker": "o"}, "rejected": {"color": "#c0392b", "marker": "X"}}


def draw_versions(points: Sequence[Measured], title: str, old_limit: float | None = None) -> tuple[Any, list[Any]]:
    """The plane's figure and its point labels (matplotlib Annotations, in the order of `points`)."""
    from knowstack.report.figures import plt
    from knowstack.report.labels import place_labels

    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    for status, style in STATUS_STYLE.items():
        chosen = [p for p in points if p.status == status]
        ax.scatter([p.old_change for p in chosen], [p.new_gain for p in chosen], s=70, edgecolors="black",
                   linewidths=0.5, zorder=3, label=f"{status} ({len(chosen)})", **style)
    if old_limit is not None:
        ax.axvspan(min([-old_limit, *(p.old_change for p in points)]) - 5, -old_limit, color="#c0392b", alpha=0.07,
                   label=f"below the latest gate (-{old_limit:g}% AVE)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.margins(0.15)  # room around the outermost points for their labels
    _at_least_one_percent(ax)
    ax.set_xlabel("old knowledge: AVE change from the base (%)")
    ax.set_ylabel("new knowledge: AVnew gain from the base (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    labels = place_labels(ax, [(p.old_change, p.new_gain) for p in points],
                          [f"{p.version} ({p.method})" for p in points])
    return fig, labels


def _at_least_one_percent(ax: Any) -> None:
    """Axes that span at least 2 percent points: versions that all score like the base (changes of 1e-17 from float
    sums) would otherwise get an axis of 1e-17 ticks."""
    for get, set_ in ((ax.get_xlim, ax.set_xlim), (ax.get_ylim, ax.set_ylim)):
        low, high = get()
        if high - low < 2.0:
            middle = (low + high) / 2
            set_(middle - 1.0, middle + 1.0)


def plot_versions(reg: Registry, path: Path) -> list[Measured]:
    """Draw every measured composed version to `path` (PNG, written atomically); returns the points drawn."""
    from knowstack.report.figures import save_figure

    records = reg.versions()
    points = measured_versions(records)
    gates = [r["settings"]["gate"] for r in composed(records) if r["settings"].get("gate")]
    fig, _ = draw_versions(points, f"Versions of {reg.name}: what each learned and what it forgot",
                           gates[-1]["old_limit_pct"] if gates else None)
    save_figure(fig, Path(path))
    return points
