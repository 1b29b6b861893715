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
            ax.annotate(p.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_ylabel(robust_label)
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
    fig.savefig(path)
    plt.close(fig)
    return [p.name for p in ordered]
