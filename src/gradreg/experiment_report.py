"""The report of a finished experiment: Markdown, CSV, JSON and plots, one function per section
(:func:`write_report` puts them in order). It reads :mod:`gradreg.tables`' result model and runs
no training or attack, so ``gradreg reproduce --report-only`` re-renders a folder with it.

Sections: the header and column description, the table, the rows that share one objective,
the rows' protocol notes, the λ of every row (with each sweep's validation curve), the
robustness-per-compute frontier, the honest reading, the catastrophic-overfitting monitor,
the norms each model has, AutoAttack's provenance, the differences between rows, the transfer
sources, the plots and the masking checks.

Why over 500 lines: every section of the report lives here, so that ``reproduce`` and
``--report-only`` render from one place; :func:`write_report` still builds the table, header,
differences and plots inline (moving each into its own function is open work)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from . import experiments
from . import stats
from .analysis import norm_stats, norms_markdown, plot_norm_distributions
from .cost import relative_cost
from .frontier import FrontierPoint, plot_frontier
from .monitor import GAP
from .protocols import (
    EvalSettings,
    masking_lines,
    bits,
    masking_summary,
)
from .report import (fmt, fmt_interval, interval_columns, markdown_table, plot_curves, plot_lambda_curves, plot_matrix,
                     write_csv, write_json)
from .stats import adjust_family, compare, over_seeds

from .tables import (ATTACK_COLUMNS, DATA_LABELS, LRC_DATA_COLUMN, RowResult, LRCSettings, lrc_column, LamChoice, Reuse, aa_columns, worst_column, display_columns, cell_scores, cell_values, cell, cell_interval, COMPARED_COLUMNS, difference_lines)


def monitor_cell(res: RowResult) -> str:
    """The table's overfitting cell: seeds the drop rule flagged, and seeds whose last check had
    FGSM far above PGD (the gap sign), out of the seeds the monitor watched; "–" if none was."""
    recs = [r for r in res.monitor if r]
    if not recs:
        return "–"
    flagged = sum(1 for r in recs if r["flags"])
    gap = sum(1 for r in recs if r["gap_flag"])
    return f"{flagged}/{len(recs)}" + (f", gap {gap}/{len(recs)}" if gap else "")


def monitor_lines(results: dict[str, RowResult]) -> list[str]:
    """The report's section on the catastrophic-overfitting monitor (what each training's
    monitor saw, per row over its seeds)."""
    def mean(recs: list[dict[str, Any]], key: str) -> str:
        vals = [r[key] for r in recs if r.get(key) is not None]
        return f"{100 * sum(vals) / len(vals):.1f}" if vals else "–"

    rows = []
    for name, res in results.items():
        recs = [r for r in res.monitor if r]
        if not recs:
            continue
        rows.append([name, monitor_cell(res), mean(recs, "best_pgd_accuracy"), mean(recs, "last_fgsm_accuracy"),
                     mean(recs, "last_pgd_accuracy"), ", ".join(sorted({r["outcome"] for r in recs}))])
    if not rows:
        return ["## Catastrophic-overfitting monitor", "", "Not measured: no run of this report had the monitor on.", ""]
    first = next(r for res in results.values() for r in res.monitor if r)
    return ["## Catastrophic-overfitting monitor", "",
            f"Every training ran the monitor (gradreg.monitor): FGSM and PGD-10 accuracy at {first['norm']} "
            f"ε = {first['eps']:g} on a fixed held-out batch of {first['points']} points after every epoch. "
            "'flagged' counts the seeds in which the drop rule fired (PGD accuracy more than 20 points below its best "
            "earlier check while FGSM held: Wong et al. 2020's early-stopping rule); 'gap' the seeds whose last check had "
            f"FGSM accuracy more than {100 * GAP:.0f} points above PGD accuracy (our second sign: a model that overfits "
            "to FGSM from its first epoch has no healthy check to fall from). Accuracies in %, means over seeds; "
            "the batch is small (an interval on 256 points is about ±6 points), so these are alarms, not estimates.", "",
            markdown_table(["method", "flagged", "best PGD", "last FGSM", "last PGD", "outcome"], rows), ""]


def describe_columns(exp: experiments.Experiment, settings: EvalSettings, grid: list[float],
                     lrc: LRCSettings | None, data_label: str, *, seeds: list[int]) -> str:
    """The paragraph under the title that says what every kind of column in the table measures."""
    has = {"grid": any(c in ATTACK_COLUMNS or c.startswith("←") for c in exp.columns),
           "transfer": any(c.startswith("←") for c in exp.columns), "rho": "ρ" in exp.columns}
    points = "all" if settings.n_test is None else f"the first {settings.n_test}"
    parts = []
    if has["grid"]:
        parts.append(f"Accuracies in %, averaged over the ε grid {{{', '.join(f'{e * 255:.3g}/255' for e in grid)}}} "
                     f"({exp.norm}); PGD-{settings.pgd_steps} with random start on the predicted label; "
                     f"{points} test points.")
    else:
        parts.append(f"Accuracies in %; {points} test points.")
    if "T-PGD" in exp.columns:
        parts.append("T-PGD: targeted PGD at each of the K − 1 other classes in turn; a point counts only if no "
                     "target changes its class (our reading of the paper's T-PGD).")
    if len(seeds) > 1:
        parts.append(f"Every row is trained once per seed ({', '.join(map(str, seeds))}): a cell reads "
                     "'mean ± standard deviation over seeds [95 % interval]', the interval combining the seeds' "
                     "t-interval with the test points' Wilson interval (gradreg.stats.over_seeds).")
    else:
        parts.append("A cell reads 'accuracy [95 % interval]': Wilson's interval on the n test points (for a grid "
                     "average, Wilson's interval at its mean, which is at least as wide as needed).")
    if exp.paper:
        parts.append("Paper numbers are in parentheses.")
    if exp.autoattack_eps is not None:
        restarts = f", {settings.pgd_restarts} random starts" if settings.pgd_restarts > 1 else ""
        parts.append(f"'PGD ε={exp.autoattack_eps:g}' and 'AA ε={exp.autoattack_eps:g}': PGD-{settings.pgd_steps}"
                     f"{restarts} and AutoAttack at the training ε on the same points (AutoAttack on the true label). "
                     f"'worst ε={exp.autoattack_eps:g}' is the robust column the verdicts use: the per-point worst case "
                     "over every attack run on the point (PGD with its restarts, AutoAttack's attacks, and Square where "
                     "the masking audit ran it); a point counts only if all of them left it standing.")
    if settings.square_n:
        parts.append(f"Masking audit: Square ({settings.square_queries} queries) on the first {settings.square_n} of "
                     "those points for the gradient-penalty rows (gradreg.protocols.square_check).")
    if "pgd" in settings.attacks and "PGD" not in exp.columns:
        parts.append(f"Raw PGD ε curves (every radius attacked afresh) at ε ∈ {{{', '.join(f'{e:g}' for e in grid)}}} "
                     "on the same points are the evidence of the masking check 'accuracy falls with ε' (plot below).")
    if has["transfer"]:
        parts.append("'←M' is PGD transferred from a twin of row M: the same method trained with another seed, so no "
                     "cell (the diagonal included) is crafted on the model it judges.")
    if has["rho"]:
        parts.append("ρ is DeepFool's mean ‖r‖₂/‖x‖₂.")
    if lrc is not None:
        scale = (f"s = σ_data = {lrc.marginal_std:.4g}, the square root of the training inputs' mean per-pixel "
                 "variance (Σ_LRC standardized to the data's marginal variance; our reading)"
                 if lrc.scale == "data" else "s = 1")
        parts.append(f"LRC columns: accuracy under worst-of-{lrc.samples} long-range-correlated Gaussian noise "
                     f"(SGR paper) at strength ε = {lrc.eps:g} on the predicted label: x + ε·s·ξ, clipped to the "
                     f"bounds; a point counts only if all {lrc.samples} copies are classified correctly. "
                     f"'LRC ζ=Z': ξ ~ N(0, Σ_LRC) with decay length Z pixels and unit marginal variance, {scale}.")
        if LRC_DATA_COLUMN in exp.columns:
            parts.append(f"'{LRC_DATA_COLUMN}': ξ ~ N(0, Σ_data), Σ_data the covariance of the training inputs of "
                         f"{data_label}, s = 1 (our reading of the paper's \"data covariance as Σ_LRC\").")
    parts.append("'step ×clean': the median over interleaved rounds of a training step's time over the clean step's "
                 "in the same round, with the interquartile range (gradreg.cost); 'train min': the wall-clock "
                 "training time of the run (mean over seeds), which depends on the machine's load.")
    return " ".join(parts)


def write_report(exp: experiments.Experiment, budget_name: str, budget: dict[str, Any], results: dict[str, RowResult],
                 matrix: dict[str, dict[str, list[float]]], out: Path, settings: EvalSettings, *,
                 elapsed: float, lrc: LRCSettings | None = None, seeds: list[int] | None = None,
                 twins: list[int] | None = None, provenance: list[dict[str, Any]] | None = None,
                 tuning: dict[str, LamChoice] | None = None,
                 norms: dict[str, dict[str, torch.Tensor]] | None = None,
                 reuse: Reuse | None = None, stored_norms: dict[str, list[dict[str, Any]]] | None = None,
                 rendered_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report, table and plots of a finished experiment (``rendered_from``: the stored
    summary that :func:`report_only` re-renders, whose time and norms it carries over)."""
    data = budget["data"]
    seeds = seeds or [int(budget.get("seed", 0))]
    columns = display_columns(exp)
    names_cols = [c for c, _ in columns]
    watched = any(r for res in results.values() for r in res.monitor)
    header = ["method", *names_cols, "step ×clean", "train min", *(["overfit"] if watched else []), "checks"]
    rows, raw_rows = [], []
    lams = {n: c.lam for n, c in (tuning or {}).items()}
    aliases = alias_groups([r for r in exp.rows if r.name in results], lams)
    aliased = {a for names in aliases.values() for a in names}
    shown = {n: r for n, r in results.items() if n not in aliased}  # one row per objective
    for name, res in shown.items():
        paper = exp.paper.get(name, [])
        cells = []
        for col, j in columns:
            theirs = paper[j] if j is not None and j < len(paper) else None
            if col == "ρ":
                text = fmt(cell(res, col), percent=False)
                text += f" ({theirs:.3f})" if theirs is not None else ""
            else:
                text = fmt_interval(cell_interval(res, col))
                text += f" ({theirs:.1f})" if theirs is not None else ""
            cells.append(text)
        minutes = sum(res.train_seconds) / len(res.train_seconds) / 60
        label = name + (f" (≡ {', '.join(aliases[name])})" if name in aliases else "")
        rows.append([label, *cells, res.step_cost.text() if res.step_cost else "–",
                     f"{minutes:.1f}" if math.isfinite(minutes) else "–",
                     *([monitor_cell(res)] if watched else []),
                     masking_summary([c for ev in res.evals for c in ev.checks])])
        raw: list[object] = [name]
        for col in names_cols:
            iv = None if col == "ρ" else cell_interval(res, col)
            raw += [cell(res, col), iv.lo if iv else None, iv.hi if iv else None]
        cost = res.step_cost
        raw_rows.append([*raw, len(res.evals), res.eval.n, sum(res.train_seconds) / len(res.train_seconds),
                         cost.ratio if cost else None, cost.lo if cost else None, cost.hi if cost else None])
    table = markdown_table(header, rows)
    grid = settings.grid(data)
    data_label = DATA_LABELS.get(data, data)
    seeds_text = f"seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    lines = [
        f"# {exp.title}", "",
        f"Experiment `{exp.name}`, budget `{budget_name}`, {seeds_text}: trained and evaluated on **{data_label}**"
        + (f"; the paper's numbers (in parentheses) are on {exp.paper_data}, so they are a reference, not a like-for-like "
           "comparison" if exp.paper_data and data not in exp.paper_data.lower() else "") + ".",
        "",
        describe_columns(exp, settings, grid, lrc, data_label, seeds=seeds)
        + (" 'overfit': the seeds in which the catastrophic-overfitting monitor fired, and those ending with FGSM "
           "far above PGD ('gap'), out of the seeds trained (section below)." if watched else ""), "",
        table, "",
        f"Budget: {json.dumps(budget)}. " + (
            f"This invocation took {elapsed / 60:.1f} min on "
            f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}." + (reuse.text() if reuse else "")
            if rendered_from is None else
            "Re-rendered from the stored per-example outcomes by `gradreg reproduce --report-only`: no training or attack "
            "ran for this report" + (f"; the runs' last invocation took {rendered_from['elapsed_seconds'] / 60:.1f} min"
                                     if rendered_from.get("elapsed_seconds") else "") + "."
            + (f" The budget above is the experiment file's today; it now also asks for {' and '.join(rendered_from['lacking'])}, "
               "which the stored outcomes predate (the models are not re-attacked), so the masking checks that need "
               "them read 'not measured'." if rendered_from.get("lacking") else "")), "",
    ]
    if aliases:
        lines += ["Rows with one objective: " + "; ".join(
            f"{', '.join(names)} train{'s' if len(names) == 1 else ''} the same objective as {first} at the λ used "
            f"({_objective_text(resolved_objective(next(r for r in exp.rows if r.name == first), lams.get(first)))}), "
            f"so the table, the tests and the honest reading show it once, as {first}; "
            f"{'its' if len(names) == 1 else 'their'} own runs stay in results.json" for first, names in aliases.items())
            + " (gradreg.experiment_report.resolved_objective).", ""]
    if exp.note:
        lines += [exp.note, ""]
    row_notes = [f"- **{r.name}**: {r.note}" for r in exp.rows if r.note and r.name in results]
    if row_notes:  # which variant each row runs (e.g. which adversarial training)
        lines += ["Rows:", "", *row_notes, ""]
    if tuning:
        lines += tuning_lines(tuning, {n: r.method for n, r in results.items()}, out)
    frontier: dict[str, Any] = {}
    reading: dict[str, Any] = {}
    if exp.autoattack_eps is not None:
        aa_col = worst_column(exp)
        front_points = frontier_points(shown, aa_col)
        if front_points:
            frontier = {"front": plot_frontier(front_points, out / "frontier.png",
                                               title=f"robustness per compute ({data}, {aa_col})",
                                               robust_label=f"{aa_col}: worst case over the attacks (%)"),
                        "points": [dataclasses.asdict(p) for p in front_points]}
            lines += frontier_lines(front_points, frontier["front"], aa_col)
        if exp.reading:
            reading = honest_reading(exp.reading, shown, aa_col, aliases)
            lines += ["## Honest reading", "", reading["sentence"], "", *[f"- {v}" for v in reading["rows"]], ""]
    if watched:
        lines += monitor_lines(shown)
    if norms:
        plot_norm_distributions(norms, str(out / "norms.png"), title=f"what each method regularizes ({data}, as trained)")
        lines += ["## What each method regularizes", "",
                  f"Per-example norms of the trained models (first seed) on the first {next(iter(norms.values()))['grad_l1'].numel()} "
                  f"test points, model in eval mode: ‖∇ₓL‖₁ (DataGrad-ℓ1, Lyu ℓ∞), ‖∇ₓL‖₂ (DataGrad-ℓ2, GN) and "
                  f"‖J(x)‖_{{{exp.norm},l2}} of the logits' Jacobian (the operator-norm penalty; cold power method, "
                  "a lower bound for p ≠ 2), as median [quartiles] (gradreg.analysis).", "",
                  norms_markdown(norms), "![norms](norms.png)", ""]
    elif stored_norms:  # re-rendered: the stored quartiles (the plot is the run's norms.png)
        table_rows = [[m, q["quantity"], f"{q['median']:.4g}", f"{q['q1']:.4g}", f"{q['q3']:.4g}", str(q["n"])]
                      for m, qs in stored_norms.items() for q in qs]
        lines += ["## What each method regularizes", "",
                  "Per-example norms of the trained models (first seed), as stored by the run: ‖∇ₓL‖₁, ‖∇ₓL‖₂ and "
                  f"‖J(x)‖_{{{exp.norm},l2}}, median and quartiles (gradreg.analysis).", "",
                  markdown_table(["method", "quantity", "median", "q1", "q3", "n"], table_rows), "",
                  "![norms](norms.png)", ""]
    aa_runs = [a["run"] for res in results.values() for a in res.eval.autoattack or []]
    if aa_runs:
        r, n = aa_runs[0], results[next(iter(results))].eval.autoattack[0]["n"]  # type: ignore[index]  # present: aa_runs is non-empty
        lines += [f"AutoAttack: {r['package']} {r['package_version']}, version {r['version']}, attacks "
                  f"{', '.join(r['attacks'])}, seed {r['seed']}, first {n} test points.", ""]
    # what the statistics allow us to say about differences between rows
    reference = next((n for n, r in shown.items() if r.method == "clean"), None)
    sentences = []
    for col in [c for c in names_cols if c in COMPARED_COLUMNS or c.startswith("worst ε=")]:
        scores = {n: torch.stack(sc) if len(sc) > 1 else sc[0]
                  for n, r in shown.items() if (sc := cell_scores(r, col)) is not None}
        if len(scores) > 1:
            sentences += difference_lines(col, scores, reference=reference)
    if sentences:
        test = ("exact McNemar test" if len(seeds) == 1 else
                "two-level randomization test over seeds and test points, gradreg.stats.two_level_test")
        lines += ["## Differences between rows", "",
                  f"Paired tests on the same test points ({test}; grid averages: the same test on each point's "
                  "average), α = 0.05. The tests of one column are one family: their p-values are Holm-adjusted "
                  "(raw and adjusted p shown), and a difference is stated only where the adjusted p is below α.", ""]
        lines += [f"- {s}" for s in sentences] + [""]
    if provenance:
        lines += ["## Transfer sources", "",
                  "Every transfer column is crafted on a twin of the source row (same method, another training seed); "
                  "no twin is the model it is judged on.", ""]
        lines += [f"- seed {p['seed']}: ←{p['source']} crafted on {p['source_run']} (seed {p['source_seed']})"
                  for p in provenance] + [""]
    pgd_curves = {n: (r.eval.eps, _seed_mean([ev.curves["pgd"] for ev in r.evals]))
                  for n, r in results.items() if "pgd" in r.eval.curves}
    if pgd_curves:
        bands = {n: _curve_band(r, "pgd") for n, r in results.items() if "pgd" in r.eval.flags}
        points = {}
        for n, r in results.items():
            iv = cell_interval(r, aa_columns(exp)[1]) if exp.autoattack_eps is not None else None
            if iv is not None:
                points[f"{n} AutoAttack"] = ([float(exp.autoattack_eps)], [iv.value], [iv.lo], [iv.hi])  # type: ignore[arg-type]  # plot_curves takes (x, y, lo, hi) series as well
        plot_curves(out / "pgd.png", pgd_curves, title=f"PGD accuracy vs ε ({data}), 95 % bands",
                    xlabel="ε (input units)", bands=bands, points=points)
        lines.append("![PGD accuracy](pgd.png)")
    zeta_cols = [(c, z) for c in exp.columns if isinstance(z := lrc_column(c), float)]
    if lrc is not None and zeta_cols:
        lrc_plot = {n: ([z for _, z in zeta_cols], [_or_nan(cell(r, c)) for c, _ in zeta_cols])
                    for n, r in results.items()}
        lrc_bands = {n: ([iv.lo if (iv := cell_interval(r, c)) else math.nan for c, _ in zeta_cols],
                         [iv.hi if (iv := cell_interval(r, c)) else math.nan for c, _ in zeta_cols])
                     for n, r in results.items()}
        plot_curves(out / "lrc.png", lrc_plot, title=f"LRC worst-of-{lrc.samples}, ε = {lrc.eps:g} ({data})",
                    xlabel="decay length ζ (pixels)", logx=True, bands=lrc_bands)
        lines.append("![LRC accuracy](lrc.png)")
    if matrix:
        names = list(results)
        srcs = list(matrix)
        avg = [[sum(matrix[s][t]) / len(matrix[s][t]) for t in names] for s in srcs]
        plot_matrix(out / "transfer.png", avg, rows=[f"twin of {s}" for s in srcs], cols=names,
                    title="PGD transfer accuracy (avg over ε)", xlabel="target", ylabel="source")
        lines.append("![transfer](transfer.png)")
    lines += ["", *masking_lines([(f"{res.name}" + (f" (seed {seed})" if len(seeds) > 1 else ""), ev.checks)
                                  for res in results.values() for seed, ev in zip(seeds, res.evals)])]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_csv(out / "table.csv", ["method", *[k for c in names_cols for k in interval_columns(c)], "seeds", "n",
                                  "train_seconds", "step_cost", "step_cost_lo", "step_cost_hi"], raw_rows)
    summary = {"experiment": exp.name, "budget": budget_name, "data": data, "columns": exp.columns,
               "display_columns": names_cols, "seeds": seeds, "transfer_twin_seeds": twins,
               "rows": {n: {"cells": dict(zip(exp.columns, [cell(r, c) for c in exp.columns])),
                            "extra_cells": {c: cell(r, c) for c in aa_columns(exp)},
                            "intervals": {c: iv.as_dict() for c in names_cols if (iv := cell_interval(r, c))},
                            "per_seed": {c: cell_values(r, c) for c in names_cols},
                            "train_seconds": sum(r.train_seconds) / len(r.train_seconds),
                            "train_seconds_per_seed": r.train_seconds,
                            "step_cost": r.step_cost.as_dict() if r.step_cost else None,
                            "test_accuracy_per_seed": r.test_accuracy,
                            "lrc_per_seed": r.lrc,
                            "monitor_per_seed": r.monitor,
                            "transfer_outcomes": {s: [[bits(row) for row in f] for f in fs] for s, fs in r.transfer.items()},
                            "eval": r.eval.to_dict(), "evals": [ev.to_dict() for ev in r.evals]}
                        for n, r in results.items()},
               "aliases": aliases, "elapsed_seconds": elapsed if rendered_from is None else
               rendered_from.get("elapsed_seconds"),
               "paper": exp.paper, "transfer": matrix, "transfer_sources": provenance or [],
               "differences": sentences, "table_markdown": table}
    if lrc is not None:
        summary["lrc"] = {"eps": lrc.eps, "samples": lrc.samples, "scale": lrc.scale,
                          "marginal_std": lrc.marginal_std}
    if tuning:
        summary["lam"] = {n: dataclasses.asdict(c) for n, c in tuning.items()}
    if frontier:
        summary["frontier"] = frontier
    if reading:
        summary["reading"] = reading
    if norms:
        summary["norms"] = {n: [vars(s) for s in norm_stats(v)] for n, v in norms.items()}
    elif stored_norms:
        summary["norms"] = stored_norms
    write_json(out / "results.json", summary)
    print(table)
    print(f"report: {out / 'report.md'}")
    return summary


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


def honest_reading(reading: dict[str, Any], results: dict[str, RowResult], aa_column: str,
                   aliases: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Which rows reach ``accuracy_fraction`` of the reference row's *gain over clean* in the
    robust column at no more than ``cost_fraction`` of its step cost.

    - Bar (per point and seed): clean + f·(reference − clean), the clean row's and the
      reference's outcomes on the same points (f = ``accuracy_fraction``; without a clean row,
      f·reference). A share of the gain, not of the reference's accuracy: at ε = 0.1 on MNIST a
      clean model keeps ~79 %, so 0.9 × the reference would be a bar only ~40 % of the way.
    - Accuracy: a paired test of the row's outcomes against the bar (gradreg.stats.compare: the
      two-level test over seeds and points); the verdicts of all candidates are one family,
      Holm-adjusted. A row "reaches" the bar only where the adjusted test says it is above.
    - Cost: the row's median step ratio over the reference's, with its bootstrap interval over
      the interleaved rounds (gradreg.cost.relative_cost); "on the edge" where that interval
      holds the cost bar, which is then not a pass.
    - Candidates: every row but the reference, the clean row and rows of ``exclude_methods``:
      cheap baselines (FGSM-AT, FGSM with random start) compete like any regularizer. A row
      that is an alias of another (same resolved objective) is judged once, under its first name."""
    ref_name = str(reading["reference"])
    acc_frac, cost_frac = float(reading.get("accuracy_fraction", 0.9)), float(reading.get("cost_fraction", 0.35))
    exclude = set(reading.get("exclude_methods", ())) | {"clean"}
    skipped = {a for names in (aliases or {}).values() for a in names}
    question = (f"Which method, if any, reaches {acc_frac:.0%} of {ref_name}'s gain over clean training in "
                f"{aa_column} at ≤ {cost_frac:.0%} of its training cost?")
    ref = results.get(ref_name)
    ref_scores = cell_scores(ref, aa_column) if ref is not None else None
    if ref is None or ref.step_cost is None or ref_scores is None:
        return {"sentence": f"{question} Not answerable here: {ref_name} has no {aa_column} cell or step cost.",
                "rows": [], "reached": []}
    ref_flat = (torch.stack(ref_scores) if len(ref_scores) > 1 else ref_scores[0]).double()  # (n,) or (S, n)
    clean_row = next((r for r in results.values() if r.method == "clean"), None)
    clean_scores = cell_scores(clean_row, aa_column) if clean_row is not None else None
    base = ((torch.stack(clean_scores) if len(clean_scores) > 1 else clean_scores[0]).double()
            if clean_scores is not None else torch.zeros_like(ref_flat))
    bar_scores = base + acc_frac * (ref_flat - base)  # per point and seed, in [0, 1]
    ref_aa, base_aa, bar_value = float(ref_flat.mean()), float(base.mean()), float(bar_scores.mean())
    if ref_aa <= base_aa:
        return {"sentence": f"{question} Void here: {ref_name}'s {aa_column} accuracy ({100 * ref_aa:.1f} %) is no "
                            f"gain over clean training's ({100 * base_aa:.1f} %).", "rows": [], "reached": []}
    candidates, tests, costs = [], [], []
    for name, res in results.items():
        scores = cell_scores(res, aa_column)
        if name == ref_name or name in skipped or res.method in exclude or scores is None or res.step_cost is None:
            continue
        candidates.append(name)
        tests.append(compare(torch.stack(scores) if len(scores) > 1 else scores[0], bar_scores, a=name, b="the bar"))
        costs.append(relative_cost(res.step_cost, ref.step_cost))
    tests = adjust_family(tests)
    verdicts, reached, undecided, edge, cheap_rows = [], [], [], [], []
    for name, test, cost in zip(candidates, tests, costs):
        verdict = ("reaches the bar" if test.significant and test.diff > 0 else
                   "falls short of the bar" if test.significant else "not distinguishable from the bar at this n")
        where = cost.versus(cost_frac)
        if where == "within":
            cheap_rows.append(name)
            if verdict == "reaches the bar":
                reached.append(name)
            elif not test.significant:
                undecided.append(name)
        elif where == "on the edge of" and verdict != "falls short of the bar":
            edge.append(name)
        alias = f" (≡ {', '.join(aliases[name])})" if aliases and aliases.get(name) else ""
        verdicts.append(f"{name}{alias}: cost {cost.text()} of {ref_name}'s, {where} the {cost_frac:.0%} bar; "
                        f"{aa_column} {100 * float(test.diff + bar_value):.1f} vs the bar {100 * bar_value:.1f}: "
                        f"{verdict} ({test.p_text()}, difference {100 * test.diff:+.1f} points, n = {test.n}, "
                        f"{test.seeds} seed{'s' if test.seeds > 1 else ''})")
    bar = (f"clean {100 * base_aa:.1f} % + {acc_frac:.0%} of {ref_name}'s gain to {100 * ref_aa:.1f} % = "
           f"{100 * bar_value:.1f} %")
    if reached:
        answer = (f"**{', '.join(reached)}**: within the cost bar and above the accuracy bar ({bar}) by the paired "
                  "two-level test, Holm-adjusted over the candidates.")
    elif undecided or edge:
        parts = []
        if undecided:
            parts.append(f"{', '.join(undecided)} {'is' if len(undecided) == 1 else 'are'} within the cost bar but not "
                         f"distinguishable from the accuracy bar ({bar}) at this n after Holm's correction")
        if edge:
            parts.append(f"{', '.join(edge)} {'is' if len(edge) == 1 else 'are'} on the edge of the cost bar (its "
                         "interval over rounds holds the bar)")
        answer = "**None established**: " + "; ".join(parts) + "."
    elif cheap_rows:
        answer = f"**None**: every candidate within the cost bar falls short of the accuracy bar ({bar}) by a paired test."
    else:
        answer = "**None**: no candidate is within the cost bar."
    return {"sentence": f"{question} {answer}", "rows": verdicts, "reached": reached, "undecided": undecided,
            "cost_edge": edge, "reference_autoattack": ref_aa, "clean_autoattack": base_aa, "bar": bar_value,
            "accuracy_fraction": acc_frac, "cost_fraction": cost_frac,
            "tests": [t.as_dict() for t in tests]}


def resolved_objective(row: experiments.Row, lam: float | None) -> tuple[Any, ...]:
    """A canonical form of the row's training objective, equal for two rows exactly when their
    objectives are the same by construction. Known identities (our reading of the modules'
    formulas): DataGrad-ℓ1 with the finite-difference solver is (1 − λ/φ)·L(x) + (λ/φ)·L(x + φ·sign g)
    (gradreg.penalties.datagrad) and Lyu's ℓ∞ one-step solver, unclipped, is
    (1 − λ)·L(x) + λ·L(x + σ·sign g) (gradreg.penalties.lyu): both are "a mix of the clean loss
    and the loss one sign step away", keyed by (step, weight). FGSM-AT clips its point to the
    data bounds and has a BatchNorm policy, so it is not folded in. Any other row is keyed by
    its method, λ, penalty and training overrides as declared."""
    pen = dict(row.penalty)
    rest = (row.task_weight, json.dumps(row.train, sort_keys=True, default=str))
    if (row.method == "datagrad" and pen.get("p") == 1 and pen.get("solver") == "fd" and not pen.get("squared")
            and "fd_step" in pen and lam is not None and set(pen) <= {"p", "solver", "fd_step"}):
        step = float(pen["fd_step"])
        return ("sign-step mix", round(step, 12), round(lam / step, 12), *rest)
    if (row.method == "lyu" and pen.get("norm") == "linf" and pen.get("solver") == "onestep" and "sigma" in pen
            and lam is not None and set(pen) <= {"norm", "solver", "sigma"}):
        return ("sign-step mix", round(float(pen["sigma"]), 12), round(float(lam), 12), *rest)
    return ("as declared", row.method, lam, json.dumps(pen, sort_keys=True, default=str), *rest)


def _objective_text(key: tuple[Any, ...]) -> str:
    if key[0] == "sign-step mix":
        return f"(1 − w)·L(x) + w·L(x + φ·sign ∇ₓL) with φ = {key[1]:g}, w = {key[2]:g}"
    return f"{key[1]} at λ = {key[2]}, penalty {key[3]}"


def alias_groups(rows: list[experiments.Row], lams: dict[str, float | None]) -> dict[str, list[str]]:
    """First row name → the later rows with the same :func:`resolved_objective` (only groups of ≥ 2)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for row in rows:
        groups.setdefault(resolved_objective(row, lams.get(row.name, row.lam)), []).append(row.name)
    return {names[0]: names[1:] for names in groups.values() if len(names) > 1}
