"""The robustness-per-compute frontier: which methods are worth their training cost.

Each method is one :class:`FrontierPoint`: its AutoAttack accuracy, clean accuracy (each with
an interval, e.g. over seeds) and training cost relative to clean training (with its spread).
A point is on the **Pareto front** when no other point is at least as robust *and* at most
as costly, and strictly better in one of the two (maximize accuracy, minimize cost).

Example::

    rows = [FrontierPoint("PGD-AT", 0.89, (0.88, 0.90), 11.0, (10.5, 11.6), 0.98, (0.97, 0.99)), ...]
    front = pareto_front(rows)          # names on the front, cheapest first
    plot_frontier(rows, "frontier.png")
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FrontierPoint:
    """One method: accuracies are fractions in [0, 1], ``cost_ratio`` is training time over
    clean training's; each interval is (low, high) around its value."""

    name: str
    autoattack: float
    autoattack_interval: tuple[float, float]
    cost_ratio: float
    cost_interval: tuple[float, float]
    clean: float
    clean_interval: tuple[float, float]

    def __post_init__(self) -> None:
        for label, value, (lo, hi) in (("autoattack", self.autoattack, self.autoattack_interval),
                                       ("cost_ratio", self.cost_ratio, self.cost_interval),
                                       ("clean", self.clean, self.clean_interval)):
            if not all(math.isfinite(v) for v in (value, lo, hi)):
                raise ValueError(f"{self.name}: {label} and its interval must be finite")
            if not lo <= value <= hi:
                raise ValueError(f"{self.name}: {label} = {value:g} lies outside its interval ({lo:g}, {hi:g})")
        if self.cost_ratio <= 0:
            raise ValueError(f"{self.name}: cost_ratio must be > 0, got {self.cost_ratio:g}")


def dominates(a: FrontierPoint, b: FrontierPoint) -> bool:
    """``a`` is at least as robust and at most as costly as ``b``, and strictly better in one."""
    return (a.autoattack >= b.autoattack and a.cost_ratio <= b.cost_ratio
            and (a.autoattack > b.autoattack or a.cost_ratio < b.cost_ratio))


def pareto_front(points: Sequence[FrontierPoint]) -> list[str]:
    """Names of the non-dominated points (max AutoAttack accuracy, min cost), cheapest first.
    Exact duplicates are both on the front. O(n²), for tables of a few dozen methods."""
    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return [p.name for p in sorted(front, key=lambda p: (p.cost_ratio, -p.autoattack))]


def _errors(values: Sequence[float], intervals: Sequence[tuple[float, float]]) -> list[list[float]]:
    """matplotlib's asymmetric error bars: [[below …], [above …]]."""
    return [[v - lo for v, (lo, _) in zip(values, intervals)], [hi - v for v, (_, hi) in zip(values, intervals)]]


def place_labels(ax: Any, xs: Sequence[float], ys: Sequence[float], names: Sequence[str], *,
                 fontsize: float = 7, order: Sequence[int] | None = None) -> list[Any]:
    """Label every point without two labels overlapping each other or another point's marker
    (greedy, our choice: each label, in ``order``, takes the first free spot on rings of 8
    directions at growing distance, inside the axes). A name that finds no free spot is replaced
    by a number placed the same way (on wider rings), and the numbers are spelled out in a key (a
    legend placed where it covers the fewest points); only a number that finds no spot either goes
    to the spot inside the axes that covers the fewest others, with a leader line. Call it once the axes' scales and limits are final. Returns the
    labels' bounding boxes in display coordinates (a keyed point's box is its number's)."""
    from matplotlib.lines import Line2D
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    centers = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
    taken = [Bbox.from_extents(cx - 4, cy - 4, cx + 4, cy + 4) for cx, cy in centers]  # the markers
    frame = ax.get_window_extent(renderer)

    def place(i: int, label: str, *, last_resort: bool) -> Any | None:
        text = ax.annotate(label, (xs[i], ys[i]), textcoords="offset pixels", xytext=(6, 6), fontsize=fontsize)
        box = text.get_window_extent(renderer)
        w, h = box.width, box.height
        spots = [(dx * r + (0 if dx >= 0 else -w) + (-w / 2 if dx == 0 else 0),
                  dy * r + (0 if dy >= 0 else -h) + (-h / 2 if dy == 0 else 0))
                 for r in ((6, 14, 26, 40, 56) if not last_resort else (6, 14, 26, 40, 56, 72, 90, 110))
                 for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))]
        cx, cy = centers[i]
        boxes = [Bbox.from_extents(cx + ox, cy + oy, cx + ox + w, cy + oy + h) for ox, oy in spots]
        inside = [k for k, b in enumerate(boxes)
                  if frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1]
        free = [k for k in inside if not any(boxes[k].overlaps(t) for t in taken)]
        if not free and not last_resort:
            text.remove()
            return None
        # no free spot: the spot inside the axes that covers the fewest labels and markers
        k = free[0] if free else min(inside or range(len(spots)), key=lambda j: sum(boxes[j].overlaps(t) for t in taken))
        text.set_position(spots[k])
        if not free or k // 8 >= 3:  # far (≥ 40 px) or crowded: tied to its point by a thin line
            ax.annotate("", (xs[i], ys[i]), xytext=spots[k], textcoords="offset pixels",
                        arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
        taken.append(boxes[k])
        return boxes[k]

    placed: dict[int, Any] = {}
    keyed: list[int] = []
    for i in order if order is not None else range(len(names)):
        box = place(i, names[i], last_resort=False)
        if box is None:
            keyed.append(i)
        else:
            placed[i] = box
    for n, i in enumerate(keyed, 1):
        placed[i] = place(i, str(n), last_resort=True)
    if keyed:  # one legend: the panel's own entries (e.g. the Pareto front) first, then the numbers
        own_handles, own_labels = ax.get_legend_handles_labels() if ax.get_legend() is not None else ([], [])
        handles = [*own_handles, *(Line2D([], [], linestyle="none", marker=f"${n}$", color="black", markersize=6)
                                   for n in range(1, len(keyed) + 1))]
        ax.legend(handles, [*own_labels, *(names[i] for i in keyed)], loc="best", fontsize=fontsize, title="key",
                  title_fontsize=fontsize, handletextpad=0.3, borderpad=0.4, framealpha=0.9)
    return [placed[i] for i in range(len(names)) if i in placed]


def plot_frontier(points: Sequence[FrontierPoint], path: str | Path, *, title: str = "",
                  robust_label: str = "AutoAttack accuracy (%)") -> list[str]:
    """Two panels: robust accuracy (``autoattack``: AutoAttack's, or the per-point worst case
    over the attacks run, named by ``robust_label``) against training cost (log scale) and
    against clean accuracy, every point with its error bars, the Pareto front (of the cost
    panel) drawn as a step line and its points filled. Returns the front's names."""
    from .report import _pyplot

    if not points:
        raise ValueError("nothing to plot: no frontier points")
    front = set(pareto_front(points))
    plt = _pyplot()
    fig, (ax_cost, ax_clean) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    aa = [p.autoattack * 100 for p in points]
    labelled: list[tuple[Any, list[float]]] = []
    aa_err = [[e * 100 for e in side] for side in _errors([p.autoattack for p in points],
                                                            [p.autoattack_interval for p in points])]
    for ax, xs, x_err in ((ax_cost, [p.cost_ratio for p in points], _errors([p.cost_ratio for p in points],
                                                                          [p.cost_interval for p in points])),
                          (ax_clean, [p.clean * 100 for p in points],
                           [[e * 100 for e in side] for side in _errors([p.clean for p in points],
                                                                        [p.clean_interval for p in points])])):
        ax.errorbar(xs, aa, xerr=x_err, yerr=aa_err, fmt="none", ecolor="grey", elinewidth=0.8, capsize=2)
        for p, x, y in zip(points, xs, aa):
            on = p.name in front
            ax.plot([x], [y], "o", color="C3" if on else "C0", mfc="C3" if on else "white", ms=6)
        ax.set_ylabel(robust_label)
        labelled.append((ax, xs))
    ordered = sorted((p for p in points if p.name in front), key=lambda p: p.cost_ratio)
    # the front as a staircase: robustness attainable at or below each cost
    ax_cost.step([p.cost_ratio for p in ordered], [p.autoattack * 100 for p in ordered], where="post", color="C3",
                 lw=1, label="Pareto front")
    ax_cost.set_xscale("log")
    ax_cost.set_xlabel("training cost (× clean training)")
    ax_cost.legend(fontsize=8)
    ax_clean.set_xlabel("clean accuracy (%)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # labels last, once scales and layout are final; the front's first, then by robustness
    order = sorted(range(len(points)), key=lambda i: (points[i].name not in front, -points[i].autoattack))
    for ax, xs in labelled:
        place_labels(ax, xs, aa, [p.name for p in points], order=order)
    fig.savefig(path)
    plt.close(fig)
    return [p.name for p in ordered]
