"""Point labels that never overlap: each label goes to the nearest free spot around its point.

Matplotlib places an annotation where it is told, so labels of points close together print over each other. Here
each label's size is measured once with the figure's renderer; candidate spots around its point are tried nearest
first, and the first whose box (in display pixels) overlaps no label placed before it, no marker and does not leave
the axes is taken; a label far from its point gets a thin leader line. Where no candidate is free (a very crowded
plot) the one overlapping least is taken. The axes limits are frozen first, since moving them would move the points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

LEADER_FROM_PT = 14.0  # offsets longer than this get a line back to the point
_PAD_PX = 1.5


def _candidates(step_pt: float) -> list[tuple[float, float]]:
    """(dx, dy) offsets in points, nearest first: right of the point, left of it or centred above/below, out to
    20 lines up or down and 160 points aside."""
    spots = []
    for row in range(-20, 21):
        dy = row * step_pt
        if row:
            spots.append((0.0, dy + math.copysign(2.0, dy)))
        for dx in (6.0, 30.0, 60.0, 90.0, 120.0, 160.0):
            spots += [(dx, dy), (-dx, dy)]
    return sorted(spots, key=lambda s: (math.hypot(*s), s))


def _box(x: float, y: float, dx_px: float, dy_px: float, width: float, height: float) -> Bbox:
    """The label's box for an anchor (x, y) in pixels: left of the point for dx < 0, right for dx > 0, centred
    for dx == 0, vertically centred on the offset."""
    left = x + dx_px - (width if dx_px < 0 else width / 2 if dx_px == 0 else 0)
    bottom = y + dy_px - height / 2
    return Bbox.from_extents(left - _PAD_PX, bottom - _PAD_PX, left + width + _PAD_PX, bottom + height + _PAD_PX)


def _overlap(a: Bbox, b: Bbox) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def _outside(box: Bbox, frame: Bbox) -> float:
    """How much of `box` lies outside the axes, as an area."""
    return box.width * box.height - _overlap(box, frame)


def place_labels(ax: plt.Axes, points: Sequence[tuple[float, float]], texts: Sequence[str], fontsize: float = 8,
                 marker_px: float = 7.0) -> list[Annotation]:
    """Annotate each point (data coordinates) with its text, no two labels overlapping where the plot leaves room;
    returns the annotations in the order given. marker_px: half the size of a marker, kept free of labels."""
    fig = ax.figure
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    anchors = [tuple(ax.transData.transform(point)) for point in points]
    taken = [Bbox.from_extents(x - marker_px, y - marker_px, x + marker_px, y + marker_px) for x, y in anchors]
    px_per_pt = fig.dpi / 72
    placed: list[Annotation] = []
    for (x, y), point, text in zip(anchors, points, texts, strict=True):
        probe = ax.text(0, 0, text, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        best, best_cost = (6.0, 0.0), (math.inf, math.inf)
        for dx, dy in _candidates(fontsize * 1.5):
            box = _box(x, y, dx * px_per_pt, dy * px_per_pt, extent.width, extent.height)
            # overlapping a label or marker is what makes a plot unreadable; leaving the axes only costs room
            cost = (sum(_overlap(box, other) for other in taken), _outside(box, frame))
            if cost < best_cost:
                best, best_cost = (dx, dy), cost
            if cost == (0, 0):
                break
        dx, dy = best
        leader = {"arrowstyle": "-", "color": "#888888", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 3} \
            if math.hypot(dx, dy) > LEADER_FROM_PT else None
        label = ax.annotate(text, point, xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                            ha="right" if dx < 0 else "center" if dx == 0 else "left", va="center",
                            arrowprops=leader, annotation_clip=False)
        taken.append(_box(x, y, dx * px_per_pt, dy * px_per_pt, extent.width, extent.height))
        placed.append(label)
    return placed
