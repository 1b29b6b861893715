"""Writing results for people: Markdown tables, CSV, JSON and PNG plots (matplotlib, Agg)."""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .stats import Interval

Cell = str | float | int | None


def fmt(value: Cell, *, digits: int = 1, percent: bool = True) -> str:
    """A table cell: fractions as percentages (``0.9734`` → ``97.3``), ``None``/NaN as ``–``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, str):
        return value
    return f"{100 * value:.{digits}f}" if percent else f"{value:.{max(digits, 3)}f}"


def fmt_interval(iv: Interval | None, *, digits: int = 1) -> str:
    """``97.4 [96.1, 98.3]`` (percent), with seeds ``97.4 ± 0.3 [95.9, 98.6]``; None as ``–``."""
    return "–" if iv is None else iv.text(digits=digits)


def interval_columns(name: str) -> list[str]:
    """CSV columns of one accuracy: value, lower and upper end of its 95 % interval."""
    return [name, f"{name}_lo", f"{name}_hi"]


def autoattack_text(run: Mapping[str, Any], n: int) -> str:
    """What an AutoAttack column ran, in words (the one wording of ``gradreg eval`` and
    ``gradreg reproduce``): package and version, version, attacks, seed, points, and whether it
    ran only on the points PGD left standing (``run["after_pgd"]``)."""
    chained = ", only on the points PGD left standing (its column is the worst case of both)" if run.get("after_pgd") else ""
    return (f"AutoAttack: {run['package']} {run['package_version']}, version {run['version']}, attacks "
            f"{', '.join(run['attacks'])}, seed {run['seed']}, first {n} test points{chained}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: Path, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
                xlabel: str, ylabel: str = "accuracy (%)", percent: bool = True, logx: bool = False,
                bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                points: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]]
                | None = None) -> Path:
    """One line per name: ``curves[name] = (xs, ys)``; fractions shown as percentages.

    ``bands[name] = (lo, hi)``: the 95 % interval drawn as a shaded band around that line;
    ``points[name] = (xs, ys, lo, hi)``: single results (e.g. AutoAttack) with error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    k = 100 if percent else 1
    for name, (xs, ys) in curves.items():
        (line,) = ax.plot(list(xs), [k * y for y in ys], marker="o", markersize=3, label=name)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(list(xs), [k * v for v in lo], [k * v for v in hi], color=line.get_color(), alpha=0.15,
                            linewidth=0)
    for name, (xs, ys, lo, hi) in (points or {}).items():
        err = [[k * (y - a) for y, a in zip(ys, lo)], [k * (b - y) for y, b in zip(ys, hi)]]
        ax.errorbar(list(xs), [k * y for y in ys], yerr=err, fmt="s", markersize=5, capsize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if percent:
        ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_lambda_curves(path: Path, curves: Mapping[str, Sequence[tuple[float, float, float]]],
                       chosen: Mapping[str, float | None], *, title: str) -> Path:
    """One small panel per row: validation PGD accuracy (solid) and clean accuracy (dashed)
    against λ on a log axis, the chosen λ ringed. ``curves[name]`` is ``(λ, clean, PGD)``
    fractions sorted by λ."""
    plt = _pyplot()
    names = [n for n, c in curves.items() if c]
    cols = min(4, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.4 * nrows), dpi=110, squeeze=False)
    for ax, name in zip(axes.flat, names):
        lams = [c[0] for c in curves[name]]
        ax.plot(lams, [100 * c[2] for c in curves[name]], marker="o", markersize=3, label="PGD")
        ax.plot(lams, [100 * c[1] for c in curves[name]], linestyle="--", color="grey", label="clean")
        pick = chosen.get(name)
        for lam, _, pgd in curves[name]:
            if pick is not None and math.isclose(lam, pick, rel_tol=1e-9):
                ax.plot([lam], [100 * pgd], marker="o", markersize=9, fillstyle="none", color="black")
        if min(lams) > 0:
            ax.set_xscale("log")
        ax.set_title(name, fontsize=8)
        ax.set_ylim(-2, 102)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_matrix(path: Path, matrix: Sequence[Sequence[float]], *, rows: Sequence[str], cols: Sequence[str],
                title: str, xlabel: str, ylabel: str) -> Path:
    """A heat map with the value (in %) written in every cell."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2.5, 0.7 * len(rows) + 2), dpi=120)
    data = [[100 * v for v in r] for r in matrix]
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, r in enumerate(data):
        for j, v in enumerate(r):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
