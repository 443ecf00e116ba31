"""The registry's versions on the learn/forget plane: what each composed version gained in new knowledge
against what it lost of old knowledge, both relative to the base, released and rejected told apart, with
the latest gate's old-knowledge limit drawn. `knowstack log REG --plot versions.png`."""

from __future__ import annotations

from pathlib import Path

from knowstack.registry.advice import Measured, measured_versions
from knowstack.registry.core import Registry, composed

STATUS_STYLE = {"released": {"color": "#3b7d3b", "marker": "o"}, "rejected": {"color": "#c0392b", "marker": "X"}}


def plot_versions(reg: Registry, path: Path) -> list[Measured]:
    """Draw every measured composed version to `path` (PNG, written atomically); returns the points drawn."""
    from knowstack.report.figures import plt, save_figure

    records = reg.versions()
    points = measured_versions(records)
    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    for status, style in STATUS_STYLE.items():
        chosen = [p for p in points if p.status == status]
        ax.scatter([p.old_change for p in chosen], [p.new_gain for p in chosen], s=70, edgecolors="black",
                   linewidths=0.5, zorder=3, label=f"{status} ({len(chosen)})", **style)
    for point in points:
        ax.annotate(f"{point.version} ({point.method})", (point.old_change, point.new_gain), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")
    gates = [r["settings"]["gate"] for r in composed(records) if r["settings"].get("gate")]
    if gates:
        limit = gates[-1]["old_limit_pct"]
        ax.axvspan(min([-limit, *(p.old_change for p in points)]) - 5, -limit, color="#c0392b", alpha=0.07,
                   label=f"below the latest gate (-{limit:g}% AVE)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("old knowledge: AVE change from the base (%)")
    ax.set_ylabel("new knowledge: AVnew gain from the base (%)")
    ax.set_title(f"Versions of {reg.name}: what each learned and what it forgot")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save_figure(fig, Path(path))
    return points
