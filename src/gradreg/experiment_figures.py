"""The sections of an experiment's report that draw a figure, each returning its Markdown lines
and writing its PNG into the report's folder: the λ of every row (lambda.png), the
robustness-per-compute frontier (frontier.png), what each method regularizes (norms.png), PGD
accuracy against ε (pgd.png), LRC accuracy against ζ (lrc.png) and the transfer matrix
(transfer.png). :func:`gradreg.experiment_report.write_report` puts them in the report's order."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from . import experiments
from . import stats
from .analysis import norms_markdown, plot_norm_distributions
from .frontier import FrontierPoint, plot_frontier
from .report import markdown_table, plot_curves, plot_lambda_curves, plot_matrix
from .stats import over_seeds
from .tables import LamChoice, LRCSettings, RowResult, aa_columns, cell, cell_interval, lrc_column, worst_column


def frontier_section(exp: experiments.Experiment, results: dict[str, RowResult], *, data: str,
                     out: Path) -> tuple[list[str], dict[str, Any]]:
    """The robustness-per-compute section and frontier.png, with the front and its points for
    results.json; nothing without an AutoAttack column or rows with a step cost."""
    if exp.autoattack_eps is None:
        return [], {}
    aa_col = worst_column(exp)
    points = frontier_points(results, aa_col)
    if not points:
        return [], {}
    front = plot_frontier(points, out / "frontier.png", title=f"robustness per compute ({data}, {aa_col})",
                          robust_label=f"{aa_col}: worst case over the attacks (%)")
    return frontier_lines(points, front, aa_col), {"front": front, "points": [dataclasses.asdict(p) for p in points]}


def norms_lines(norms: dict[str, dict[str, torch.Tensor]], stored_norms: dict[str, list[dict[str, Any]]] | None, *,
                norm: str, data: str, out: Path) -> list[str]:
    """What each method regularizes: fresh per-example norms (with norms.png), or re-rendered,
    the stored quartiles (the plot is the run's norms.png); ``norm``: the threat norm p of
    ‖J(x)‖_{p,2}."""
    if norms:
        n = next(iter(norms.values()))["grad_l1"].numel()
        plot_norm_distributions(norms, str(out / "norms.png"), title=f"what each method regularizes ({data}, as trained)")
        return ["## What each method regularizes", "",
                f"Per-example norms of the trained models (first seed) on the first {n} "
                f"test points, model in eval mode: ‖∇ₓL‖₁ (DataGrad-ℓ1, Lyu ℓ∞), ‖∇ₓL‖₂ (DataGrad-ℓ2, GN) and "
                f"‖J(x)‖_{{{norm},l2}} of the logits' Jacobian (the operator-norm penalty; cold power method, "
                "a lower bound for p ≠ 2), as median [quartiles] (gradreg.analysis).", "",
                norms_markdown(norms), "![norms](norms.png)", ""]
    if stored_norms:
        rows = [[m, q["quantity"], f"{q['median']:.4g}", f"{q['q1']:.4g}", f"{q['q3']:.4g}", str(q["n"])]
                for m, qs in stored_norms.items() for q in qs]
        return ["## What each method regularizes", "",
                "Per-example norms of the trained models (first seed), as stored by the run: ‖∇ₓL‖₁, ‖∇ₓL‖₂ and "
                f"‖J(x)‖_{{{norm},l2}}, median and quartiles (gradreg.analysis).", "",
                markdown_table(["method", "quantity", "median", "q1", "q3", "n"], rows), "",
                "![norms](norms.png)", ""]
    return []


def pgd_plot_lines(exp: experiments.Experiment, results: dict[str, RowResult], *, data: str, out: Path) -> list[str]:
    """pgd.png: every row's PGD accuracy against ε (mean over seeds, 95 % bands), AutoAttack at
    the training ε as a point with its interval."""
    pgd_curves = {n: (r.eval.eps, _seed_mean([ev.curves["pgd"] for ev in r.evals]))
                  for n, r in results.items() if "pgd" in r.eval.curves}
    if not pgd_curves:
        return []
    bands = {n: _curve_band(r, "pgd") for n, r in results.items() if "pgd" in r.eval.flags}
    points = {}
    for n, r in results.items():
        iv = cell_interval(r, aa_columns(exp)[1]) if exp.autoattack_eps is not None else None
        if iv is not None:
            points[f"{n} AutoAttack"] = ([float(exp.autoattack_eps)], [iv.value], [iv.lo], [iv.hi])  # type: ignore[arg-type]  # plot_curves takes (x, y, lo, hi) series as well
    plot_curves(out / "pgd.png", pgd_curves, title=f"PGD accuracy vs ε ({data}), 95 % bands",
                xlabel="ε (input units)", bands=bands, points=points)
    return ["![PGD accuracy](pgd.png)"]


def lrc_plot_lines(exp: experiments.Experiment, results: dict[str, RowResult], lrc: LRCSettings | None, *,
                   data: str, out: Path) -> list[str]:
    """lrc.png: LRC accuracy against the decay length ζ, when the table has ζ columns."""
    zeta_cols = [(c, z) for c in exp.columns if isinstance(z := lrc_column(c), float)]
    if lrc is None or not zeta_cols:
        return []
    lrc_plot = {n: ([z for _, z in zeta_cols], [_or_nan(cell(r, c)) for c, _ in zeta_cols])
                for n, r in results.items()}
    lrc_bands = {n: ([iv.lo if (iv := cell_interval(r, c)) else math.nan for c, _ in zeta_cols],
                     [iv.hi if (iv := cell_interval(r, c)) else math.nan for c, _ in zeta_cols])
                 for n, r in results.items()}
    plot_curves(out / "lrc.png", lrc_plot, title=f"LRC worst-of-{lrc.samples}, ε = {lrc.eps:g} ({data})",
                xlabel="decay length ζ (pixels)", logx=True, bands=lrc_bands)
    return ["![LRC accuracy](lrc.png)"]


def transfer_plot_lines(results: dict[str, RowResult], matrix: dict[str, dict[str, list[float]]], *,
                        out: Path) -> list[str]:
    """transfer.png: PGD transfer accuracy (mean over ε) from each source's twin to each row."""
    if not matrix:
        return []
    names, srcs = list(results), list(matrix)
    avg = [[sum(matrix[s][t]) / len(matrix[s][t]) for t in names] for s in srcs]
    plot_matrix(out / "transfer.png", avg, rows=[f"twin of {s}" for s in srcs], cols=names,
                title="PGD transfer accuracy (avg over ε)", xlabel="target", ylabel="source")
    return ["![transfer](transfer.png)"]


def _or_nan(v: float | None) -> float:
    return math.nan if v is None else v


def _seed_mean(curves: list[list[float]]) -> list[float]:
    return [sum(v) / len(v) for v in zip(*curves)]


def _curve_band(res: RowResult, attack: str) -> tuple[list[float], list[float]]:
    """95 % band of a curve per ε: Wilson for one seed, over_seeds for several."""
    ivs = []
    for k in range(len(res.eval.eps)):
        rows = [ev.flags[attack][k] for ev in res.evals]
        ivs.append(stats.proportion(rows[0]) if len(rows) == 1 else
                   over_seeds([float(r.double().mean()) for r in rows], int(rows[0].numel())))
    return [iv.lo for iv in ivs], [iv.hi for iv in ivs]


def curve_text(choice: LamChoice) -> str:
    """The validation curve of a sweep, "λ: PGD/clean" in %, the chosen λ in bold."""
    parts = []
    for lam, clean, pgd in choice.curve:
        text = f"{lam:g}: {100 * pgd:.1f}/{100 * clean:.1f}"
        parts.append(f"**{text}**" if choice.lam is not None and math.isclose(lam, choice.lam, rel_tol=1e-9) else text)
    return ", ".join(parts) or "–"


def tuning_lines(tuning: dict[str, LamChoice], methods: dict[str, str], out: Path | None = None) -> list[str]:
    """The report's section that says which λ every row used and where it came from, with each
    sweep's validation curve (a table cell and, given ``out``, the panels of ``lambda.png``)."""
    rows, edges = [], []
    for name, c in tuning.items():
        if name not in methods:
            continue
        lam = "default" if c.lam is None else f"{c.lam:g}"
        grid = ", ".join(f"{v:g}" for v in c.grid) or "–"
        where = f"{c.source}; {c.detail}" + (f" ({c.record}/sweep.md)" if c.record else "")
        edge = grid_edge(c)
        if edge:
            lam += f" ({edge} end)"
            edges.append(name)
        rows.append([name, methods[name], lam, grid, curve_text(c), where])
    lines = ["## λ of every row", "",
             "λ of a row with a grid is `gradreg sweep`'s choice on a validation split carved from the training data "
             "(the test split is never used), at the budget's seed; the other rows keep the λ of their protocol. "
             "'validation PGD/clean by λ': the sweep's curve, validation PGD accuracy at the training ε and clean "
             "accuracy in %, the chosen λ in bold.", "",
             markdown_table(["row", "method", "λ", "grid", "validation PGD/clean by λ", "from"], rows), ""]
    curves = {n: c.curve for n, c in tuning.items() if n in methods and len(c.curve) > 1}
    if out is not None and curves:
        plot_lambda_curves(out / "lambda.png", curves, {n: tuning[n].lam for n in curves},
                           title="validation accuracy against λ (solid: PGD at the training ε; dashed: clean; ringed: chosen)")
        lines += ["![validation accuracy against λ](lambda.png)", ""]
    if edges:
        lines += [f"{len(edges)} of {sum(1 for c in tuning.values() if len(c.grid) > 1)} swept rows chose an end of "
                  f"their grid ({', '.join(edges)}): the rule's best λ may lie outside the grid, so these rows may be "
                  "under- or over-regularized; a wider grid would tell.", ""]
    return lines


def grid_edge(choice: LamChoice) -> str | None:
    """"upper" or "lower" when the sweep chose an end of a grid of several λ, else None."""
    if choice.source != "sweep" or choice.lam is None or len(choice.grid) < 2:
        return None
    if math.isclose(choice.lam, max(choice.grid)):
        return "upper"
    return "lower" if math.isclose(choice.lam, min(choice.grid)) else None


def frontier_points(results: dict[str, RowResult], aa_column: str) -> list[FrontierPoint]:
    """Rows with an AutoAttack cell, a clean cell and a step cost, as frontier points (cost: the
    interleaved step-time ratio with its interquartile range)."""
    points = []
    for name, res in results.items():
        aa, clean, cost = cell_interval(res, aa_column), cell_interval(res, "test"), res.step_cost
        if aa is None or clean is None or cost is None:
            continue
        points.append(FrontierPoint(name, aa.value, (aa.lo, aa.hi), cost.ratio, (min(cost.lo, cost.ratio), max(cost.hi, cost.ratio)),
                                    clean.value, (clean.lo, clean.hi)))
    return points


def frontier_lines(points: list[FrontierPoint], front: list[str], aa_column: str) -> list[str]:
    rows = [[p.name, f"{100 * p.autoattack:.1f} [{100 * p.autoattack_interval[0]:.1f}, {100 * p.autoattack_interval[1]:.1f}]",
             f"{p.cost_ratio:.2f}× [{p.cost_interval[0]:.2f}, {p.cost_interval[1]:.2f}]",
             f"{100 * p.clean:.1f} [{100 * p.clean_interval[0]:.1f}, {100 * p.clean_interval[1]:.1f}]",
             "●" if p.name in front else ""] for p in sorted(points, key=lambda p: p.cost_ratio)]
    return ["## Robustness per compute", "",
            f"{aa_column} against the training step's cost (× clean, interleaved; gradreg.cost) and against clean "
            f"accuracy (gradreg.frontier). ● marks the Pareto front of ({aa_column} ↑, cost ↓): no other row is at "
            "least as robust and at most as costly. Points are estimates: a row off the front may not differ from "
            f"one on it at this n (see the intervals). Front, cheapest first: {', '.join(front)}.", "",
            markdown_table(["row", aa_column, "step ×clean", "test", "front"], rows), "",
            "![frontier](frontier.png)", ""]
