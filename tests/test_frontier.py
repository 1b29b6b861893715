"""The Pareto front of (AutoAttack accuracy ↑, training cost ↓) on a hand-made table, and the plot."""
from __future__ import annotations

from pathlib import Path

import pytest

from gradreg.frontier import FrontierPoint, dominates, pareto_front, plot_frontier


def _p(name: str, aa: float, cost: float, clean: float = 0.98) -> FrontierPoint:
    return FrontierPoint(name, aa, (aa - 0.01, aa + 0.01), cost, (cost * 0.9, cost * 1.1), clean,
                         (clean - 0.005, clean + 0.005))


# worked by hand: clean (0.00, 1) is the cheapest; GN (0.30, 2) beats nothing cheaper;
# SGR (0.28, 3) is dominated by GN; TRADES (0.60, 8) and PGD-AT (0.62, 11) both survive;
# FGSM-AT (0.55, 8) is dominated by TRADES (same cost, more robust); wd (0.00, 1.5) by clean
TABLE = [_p("clean", 0.00, 1.0), _p("wd", 0.00, 1.5), _p("GN", 0.30, 2.0), _p("SGR", 0.28, 3.0),
         _p("FGSM-AT", 0.55, 8.0), _p("TRADES", 0.60, 8.0), _p("PGD-AT", 0.62, 11.0)]


def test_pareto_front_of_a_hand_made_table() -> None:
    assert pareto_front(TABLE) == ["clean", "GN", "TRADES", "PGD-AT"]
    assert dominates(TABLE[5], TABLE[4]) and not dominates(TABLE[4], TABLE[5])
    assert not dominates(TABLE[0], TABLE[0])  # not strictly better than itself
    # ties: two identical points are both on the front; a single point is its own front
    twins = [_p("a", 0.5, 2.0), _p("b", 0.5, 2.0)]
    assert pareto_front(twins) == ["a", "b"]
    assert pareto_front([TABLE[3]]) == ["SGR"]


def test_frontier_plot_and_checks(tmp_path: Path) -> None:
    assert plot_frontier(TABLE, tmp_path / "frontier.png", title="t") == ["clean", "GN", "TRADES", "PGD-AT"]
    assert (tmp_path / "frontier.png").stat().st_size > 0
    with pytest.raises(ValueError, match="outside its interval"):
        FrontierPoint("x", 0.5, (0.6, 0.7), 1.0, (1.0, 1.0), 0.9, (0.9, 0.9))
    with pytest.raises(ValueError, match="cost_ratio must be > 0"):
        FrontierPoint("x", 0.5, (0.5, 0.5), 0.0, (0.0, 0.0), 0.9, (0.9, 0.9))
    with pytest.raises(ValueError, match="no frontier points"):
        plot_frontier([], tmp_path / "none.png")


def test_labels_of_a_crowded_frontier_do_not_overlap() -> None:
    """Sixteen points packed into a corner (as a family table's cheap rows are): no two labels'
    boxes overlap, and none covers another point's marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    from gradreg.frontier import place_labels

    xs = [1.0 + 0.05 * (i % 4) for i in range(16)]
    ys = [50.0 + 1.5 * (i // 4) + 0.3 * (i % 4) for i in range(16)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, "o")
    ax.set_xlim(0.5, 2.0)
    ax.set_ylim(30, 80)
    boxes = place_labels(ax, xs, ys, [f"method number {i}" for i in range(16)])
    centers = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
    plt.close(fig)
    assert len(boxes) == 16
    for a in range(16):
        for b in range(a + 1, 16):
            assert not boxes[a].overlaps(boxes[b]), (a, b)
        for c, (cx, cy) in enumerate(centers):
            assert not boxes[a].overlaps(Bbox.from_extents(cx - 4, cy - 4, cx + 4, cy + 4)), (a, c)


def test_a_crowd_that_names_cannot_fit_gets_numbers_and_a_key() -> None:
    """Twelve methods on almost one spot (the clean-accuracy panel of the hard-radius run): the
    names that find no free spot become numbers, no two labels overlap, and the key spells every
    number out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradreg.frontier import place_labels

    xs = [95.0 + 0.1 * (i % 4) for i in range(12)]
    ys = [1.0 + 0.2 * (i // 4) for i in range(12)]
    names = [f"a rather long method name {i}" for i in range(12)]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(xs, ys, "o", label="Pareto front")
    ax.legend()  # the panel's own legend must survive the key
    ax.set_xlim(20, 100)
    ax.set_ylim(-2, 60)
    boxes = place_labels(ax, xs, ys, names)
    legend = ax.get_legend()
    plt.close(fig)
    assert len(boxes) == 12 and legend is not None
    keyed = [t.get_text() for t in legend.get_texts()]
    assert keyed[0] == "Pareto front"  # the panel's own entry stays, first
    keyed = keyed[1:]
    assert keyed and set(keyed) <= set(names)
    shown = {t.get_text() for t in ax.texts}
    assert all(n in shown for n in names if n not in keyed)  # every name is on the plot or in the key
    assert {str(k) for k in range(1, len(keyed) + 1)} <= shown
    for a in range(12):
        for b in range(a + 1, 12):
            assert not boxes[a].overlaps(boxes[b]), (a, b)
