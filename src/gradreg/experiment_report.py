"""The report of a finished experiment: Markdown, CSV, JSON and plots, one function per section;
:func:`write_report` calls them in the report's order. It reads :mod:`gradreg.tables`' result
model and runs no training or attack, so ``gradreg reproduce --report-only`` re-renders a folder
with it. What the report concludes beside its tables (rows with one objective, the honest
reading) is computed in :mod:`gradreg.reading`; the sections that draw a figure are in
:mod:`gradreg.experiment_figures`.

Sections, in order: the header (title, data, what the columns measure), the table, the
budget and where the numbers came from, the rows that share one objective, the experiment's and
rows' notes, the λ of every row (with each sweep's validation curve), the robustness-per-compute
frontier, the honest reading, the catastrophic-overfitting monitor, the norms each model has,
AutoAttack's provenance, the differences between rows (Holm-adjusted tests), the transfer
sources, the plots (PGD, LRC, transfer) and the masking checks (written by
:func:`gradreg.protocols.masking_lines`, shared with ``gradreg eval``). Then table.csv and
results.json."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import experiments
from .analysis import norm_stats
from .experiment_figures import (frontier_section, lrc_plot_lines, norms_lines, pgd_plot_lines, transfer_plot_lines,
                                 tuning_lines)
from .monitor import GAP
from .protocols import EvalSettings, bits, masking_lines, masking_summary
from .reading import alias_groups, honest_reading, objective_text, resolved_objective
from .report import autoattack_text, fmt, fmt_interval, interval_columns, markdown_table, write_csv, write_json
from .tables import (ATTACK_COLUMNS, COMPARED_COLUMNS, DATA_LABELS, LRC_DATA_COLUMN, LamChoice, LRCSettings, Reuse,
                     RowResult, aa_columns, cell, cell_interval, cell_scores, cell_values, difference_lines,
                     display_columns, worst_column)


@dataclass(frozen=True)
class ReportInput:
    """What a report is rendered from: the experiment at its budget, every row's results, and
    what the run measured beside them.

    ``matrix``: PGD transfer accuracy per (source, target) and ε; ``provenance``: the twin each
    transfer column was crafted on; ``norms``: per-example norms of a fresh run, or, re-rendered,
    ``stored_norms``: their stored quartiles. ``rendered_from``: the stored summary that
    :func:`gradreg.reproduce.report_only` re-renders, whose time it carries over (``None`` for a
    fresh run, whose ``elapsed_seconds`` and ``reuse`` the report states)."""

    exp: experiments.Experiment
    budget_name: str
    budget: dict[str, Any]
    results: dict[str, RowResult]
    settings: EvalSettings
    seeds: list[int]
    elapsed_seconds: float
    matrix: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    lrc: LRCSettings | None = None
    twins: list[int] | None = None
    provenance: list[dict[str, Any]] = field(default_factory=list)
    tuning: dict[str, LamChoice] = field(default_factory=dict)
    norms: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    reuse: Reuse | None = None
    stored_norms: dict[str, list[dict[str, Any]]] | None = None
    rendered_from: dict[str, Any] | None = None

    @property
    def data(self) -> str:
        return str(self.budget["data"])


@dataclass(frozen=True)
class Layout:
    """What several sections read, computed once from a :class:`ReportInput` (:func:`layout`)."""

    seeds: list[int]  # the input's seeds, else the budget's seed
    columns: list[tuple[str, int | None]]  # (displayed column, index into the paper's numbers or None)
    watched: bool  # some training ran the catastrophic-overfitting monitor: the table gets an "overfit" column
    lams: dict[str, float | None]  # row → the λ it was trained at (rows with a λ choice)
    aliases: dict[str, list[str]]  # first row → later rows with the same objective
    shown: dict[str, RowResult]  # one row per objective: the rows that the table, tests and reading show

    @property
    def names(self) -> list[str]:
        return [c for c, _ in self.columns]


def layout(inp: ReportInput) -> Layout:
    """The input's seeds, columns, λ and rows with one objective, for every section."""
    lams = {n: c.lam for n, c in inp.tuning.items()}
    aliases = alias_groups([r for r in inp.exp.rows if r.name in inp.results], lams)
    aliased = {a for names in aliases.values() for a in names}
    return Layout(seeds=inp.seeds or [int(inp.budget.get("seed", 0))], columns=display_columns(inp.exp),
                  watched=any(r for res in inp.results.values() for r in res.monitor), lams=lams, aliases=aliases,
                  shown={n: r for n, r in inp.results.items() if n not in aliased})


def write_report(inp: ReportInput, out: Path) -> dict[str, Any]:
    """report.md, table.csv, results.json and the plots of a finished experiment in ``out``;
    returns the summary written to results.json. Sections are computed in the report's order
    (the tests of the honest reading and of the differences draw from seeded generators)."""
    lay = layout(inp)
    table = markdown_table(*table_rows(inp, lay))
    lines = [*header_lines(inp, lay), table, "", *provenance_lines(inp), *alias_lines(inp, lay), *note_lines(inp)]
    if inp.tuning:
        lines += tuning_lines(inp.tuning, {n: r.method for n, r in inp.results.items()}, out)
    frontier_text, frontier = frontier_section(inp.exp, lay.shown, data=inp.data, out=out)
    reading_text, reading = reading_section(inp, lay)
    lines += [*frontier_text, *reading_text, *(monitor_lines(lay.shown) if lay.watched else []),
              *norms_lines(inp.norms, inp.stored_norms, norm=inp.exp.norm, data=inp.data, out=out),
              *autoattack_lines(inp.results)]
    difference_text, sentences = difference_section(lay)
    lines += [*difference_text, *transfer_source_lines(inp.provenance),
              *pgd_plot_lines(inp.exp, inp.results, data=inp.data, out=out),
              *lrc_plot_lines(inp.exp, inp.results, inp.lrc, data=inp.data, out=out),
              *transfer_plot_lines(inp.results, inp.matrix, out=out), "", *masking_section(inp, lay)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_csv(out / "table.csv", *csv_rows(inp, lay))
    summary = summary_json(inp, lay, table=table, frontier=frontier, reading=reading, differences=sentences)
    write_json(out / "results.json", summary)
    print(table)
    print(f"report: {out / 'report.md'}")
    return summary


# ---- the table ---------------------------------------------------------------------------------

def table_rows(inp: ReportInput, lay: Layout) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows: one row per objective, each cell 'value [interval]' (the
    paper's number in parentheses), then step cost, training minutes, the monitor and the checks."""
    header = ["method", *lay.names, "step ×clean", "train min", *(["overfit"] if lay.watched else []), "checks"]
    return header, [table_row(inp, lay, name, res) for name, res in lay.shown.items()]


def table_row(inp: ReportInput, lay: Layout, name: str, res: RowResult) -> list[str]:
    paper = inp.exp.paper.get(name, [])
    cells = []
    for col, j in lay.columns:
        theirs = paper[j] if j is not None and j < len(paper) else None
        if col == "ρ":
            text = fmt(cell(res, col), percent=False)
            text += f" ({theirs:.3f})" if theirs is not None else ""
        else:
            text = fmt_interval(cell_interval(res, col))
            text += f" ({theirs:.1f})" if theirs is not None else ""
        cells.append(text)
    minutes = sum(res.train_seconds) / len(res.train_seconds) / 60
    label = name + (f" (≡ {', '.join(lay.aliases[name])})" if name in lay.aliases else "")
    return [label, *cells, res.step_cost.text() if res.step_cost else "–",
            f"{minutes:.1f}" if math.isfinite(minutes) else "–",
            *([monitor_cell(res)] if lay.watched else []),
            masking_summary([c for ev in res.evals for c in ev.checks])]


def csv_rows(inp: ReportInput, lay: Layout) -> tuple[list[str], list[list[object]]]:
    """table.csv: per shown row, each column's value with its interval, then seeds, n, training
    seconds and the step cost with its interval."""
    header = ["method", *[k for c in lay.names for k in interval_columns(c)], "seeds", "n",
              "train_seconds", "step_cost", "step_cost_lo", "step_cost_hi"]
    rows = []
    for name, res in lay.shown.items():
        raw: list[object] = [name]
        for col in lay.names:
            iv = None if col == "ρ" else cell_interval(res, col)
            raw += [cell(res, col), iv.lo if iv else None, iv.hi if iv else None]
        cost = res.step_cost
        rows.append([*raw, len(res.evals), res.eval.n, sum(res.train_seconds) / len(res.train_seconds),
                     cost.ratio if cost else None, cost.lo if cost else None, cost.hi if cost else None])
    return header, rows


# ---- the text above and below the table ----------------------------------------------------------

def header_lines(inp: ReportInput, lay: Layout) -> list[str]:
    """The title, what the rows were trained and evaluated on, and what every column measures."""
    exp, data, seeds = inp.exp, inp.data, lay.seeds
    data_label = DATA_LABELS.get(data, data)
    seeds_text = f"seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    reference_only = (f"; the paper's numbers (in parentheses) are on {exp.paper_data}, so they are a reference, not a "
                      "like-for-like comparison" if exp.paper_data and data not in exp.paper_data.lower() else "")
    overfit = (" 'overfit': the seeds in which the catastrophic-overfitting monitor fired, and those ending with FGSM "
               "far above PGD ('gap'), out of the seeds trained (section below)." if lay.watched else "")
    return [f"# {exp.title}", "",
            f"Experiment `{exp.name}`, budget `{inp.budget_name}`, {seeds_text}: trained and evaluated on "
            f"**{data_label}**{reference_only}.", "",
            describe_columns(exp, inp.settings, inp.settings.grid(data), inp.lrc, data_label, seeds=seeds) + overfit, ""]


def provenance_lines(inp: ReportInput) -> list[str]:
    """The budget, and how long this invocation took (or that the report was re-rendered from
    stored outcomes, and what those outcomes predate)."""
    if inp.rendered_from is None:
        threads = torch.get_num_threads()
        how = (f"This invocation took {inp.elapsed_seconds / 60:.1f} min on {threads} thread{'s' if threads > 1 else ''}."
               + (inp.reuse.text() if inp.reuse else ""))
    else:
        stored = inp.rendered_from
        how = ("Re-rendered from the stored per-example outcomes by `gradreg reproduce --report-only`: no training or "
               "attack ran for this report" + (f"; the runs' last invocation took {stored['elapsed_seconds'] / 60:.1f} min"
                                               if stored.get("elapsed_seconds") else "") + ".")
        if stored.get("lacking"):
            how += (f" The budget above is the experiment file's today; it now also asks for "
                    f"{' and '.join(stored['lacking'])}, which the stored outcomes predate (the models are not "
                    "re-attacked), so the masking checks that need them read 'not measured'.")
    return [f"Budget: {json.dumps(inp.budget)}. " + how, ""]


def alias_lines(inp: ReportInput, lay: Layout) -> list[str]:
    """Rows that train the same objective as an earlier row (:func:`gradreg.reading.alias_groups`)."""
    if not lay.aliases:
        return []

    def sentence(first: str, names: list[str]) -> str:
        row = next(r for r in inp.exp.rows if r.name == first)
        return (f"{', '.join(names)} train{'s' if len(names) == 1 else ''} the same objective as {first} at the λ "
                f"used ({objective_text(resolved_objective(row, lay.lams.get(first)))}), so the table, the tests and "
                f"the honest reading show it once, as {first}; {'its' if len(names) == 1 else 'their'} own runs stay "
                "in results.json")
    return ["Rows with one objective: " + "; ".join(sentence(first, names) for first, names in lay.aliases.items())
            + " (gradreg.reading.resolved_objective).", ""]


def note_lines(inp: ReportInput) -> list[str]:
    """The experiment's note, and which variant each row runs (e.g. which adversarial training)."""
    lines = [inp.exp.note, ""] if inp.exp.note else []
    row_notes = [f"- **{r.name}**: {r.note}" for r in inp.exp.rows if r.note and r.name in inp.results]
    return lines + (["Rows:", "", *row_notes, ""] if row_notes else [])


def reading_section(inp: ReportInput, lay: Layout) -> tuple[list[str], dict[str, Any]]:
    """The honest reading (:func:`gradreg.reading.honest_reading`) of an experiment that asks one."""
    if inp.exp.autoattack_eps is None or not inp.exp.reading:
        return [], {}
    reading = honest_reading(inp.exp.reading, lay.shown, worst_column(inp.exp), lay.aliases)
    return ["## Honest reading", "", reading["sentence"], "", *[f"- {v}" for v in reading["rows"]], ""], reading


def autoattack_lines(results: dict[str, RowResult]) -> list[str]:
    """AutoAttack's package, version, attacks and seed, from the first run that used it."""
    aa_runs = [a["run"] for res in results.values() for a in res.eval.autoattack or []]
    if not aa_runs:
        return []
    r, n = aa_runs[0], results[next(iter(results))].eval.autoattack[0]["n"]  # type: ignore[index]  # present: aa_runs is non-empty
    return [autoattack_text(r, n) + ".", ""]


def difference_section(lay: Layout) -> tuple[list[str], list[str]]:
    """What the statistics allow us to say about differences between the shown rows: paired
    tests per compared column, Holm-adjusted per column (gradreg.tables.difference_lines);
    returns the section and its sentences (for results.json)."""
    reference = next((n for n, r in lay.shown.items() if r.method == "clean"), None)
    sentences = []
    for col in [c for c in lay.names if c in COMPARED_COLUMNS or c.startswith("worst ε=")]:
        scores = {n: torch.stack(sc) if len(sc) > 1 else sc[0]
                  for n, r in lay.shown.items() if (sc := cell_scores(r, col)) is not None}
        if len(scores) > 1:
            sentences += difference_lines(col, scores, reference=reference)
    if not sentences:
        return [], []
    test = ("exact McNemar test" if len(lay.seeds) == 1 else
            "two-level randomization test over seeds and test points, gradreg.stats.two_level_test")
    return ["## Differences between rows", "",
            f"Paired tests on the same test points ({test}; grid averages: the same test on each point's "
            "average), α = 0.05. The tests of one column are one family: their p-values are Holm-adjusted "
            "(raw and adjusted p shown), and a difference is stated only where the adjusted p is below α.", "",
            *[f"- {s}" for s in sentences], ""], sentences


def transfer_source_lines(provenance: list[dict[str, Any]]) -> list[str]:
    """Which twin every transfer column was crafted on."""
    if not provenance:
        return []
    return ["## Transfer sources", "",
            "Every transfer column is crafted on a twin of the source row (same method, another training seed); "
            "no twin is the model it is judged on.", "",
            *[f"- seed {p['seed']}: ←{p['source']} crafted on {p['source_run']} (seed {p['source_seed']})"
              for p in provenance], ""]


def masking_section(inp: ReportInput, lay: Layout) -> list[str]:
    """Every row's gradient-masking checks, per seed when there are several (the writer shared
    with ``gradreg eval``: :func:`gradreg.protocols.masking_lines`)."""
    return masking_lines([(f"{res.name}" + (f" (seed {seed})" if len(lay.seeds) > 1 else ""), ev.checks)
                          for res in inp.results.values() for seed, ev in zip(lay.seeds, res.evals)])


# ---- results.json ---------------------------------------------------------------------------------

def summary_json(inp: ReportInput, lay: Layout, *, table: str, frontier: dict[str, Any], reading: dict[str, Any],
                 differences: list[str]) -> dict[str, Any]:
    """results.json: every row's cells, intervals, per-seed values and per-example outcomes
    (what ``--report-only`` re-renders from), with the report's sections' findings."""
    exp = inp.exp
    summary = {"experiment": exp.name, "budget": inp.budget_name, "data": inp.data, "columns": exp.columns,
               "display_columns": lay.names, "seeds": lay.seeds, "transfer_twin_seeds": inp.twins,
               "rows": {n: row_json(inp, lay, r) for n, r in inp.results.items()},
               "aliases": lay.aliases, "elapsed_seconds": inp.elapsed_seconds if inp.rendered_from is None else
               inp.rendered_from.get("elapsed_seconds"),
               "paper": exp.paper, "transfer": inp.matrix, "transfer_sources": inp.provenance,
               "differences": differences, "table_markdown": table}
    if inp.lrc is not None:
        summary["lrc"] = {"eps": inp.lrc.eps, "samples": inp.lrc.samples, "scale": inp.lrc.scale,
                          "marginal_std": inp.lrc.marginal_std}
    if inp.tuning:
        summary["lam"] = {n: dataclasses.asdict(c) for n, c in inp.tuning.items()}
    if frontier:
        summary["frontier"] = frontier
    if reading:
        summary["reading"] = reading
    if inp.norms:
        summary["norms"] = {n: [vars(s) for s in norm_stats(v)] for n, v in inp.norms.items()}
    elif inp.stored_norms:
        summary["norms"] = inp.stored_norms
    return summary


def row_json(inp: ReportInput, lay: Layout, r: RowResult) -> dict[str, Any]:
    """One row of results.json: its cells, intervals, per-seed values and per-example outcomes."""
    return {"cells": dict(zip(inp.exp.columns, [cell(r, c) for c in inp.exp.columns])),
            "extra_cells": {c: cell(r, c) for c in aa_columns(inp.exp)},
            "intervals": {c: iv.as_dict() for c in lay.names if (iv := cell_interval(r, c))},
            "per_seed": {c: cell_values(r, c) for c in lay.names},
            "train_seconds": sum(r.train_seconds) / len(r.train_seconds),
            "train_seconds_per_seed": r.train_seconds,
            "step_cost": r.step_cost.as_dict() if r.step_cost else None,
            "test_accuracy_per_seed": r.test_accuracy,
            "lrc_per_seed": r.lrc,
            "monitor_per_seed": r.monitor,
            "transfer_outcomes": {s: [[bits(row) for row in f] for f in fs] for s, fs in r.transfer.items()},
            "eval": r.eval.to_dict(), "evals": [ev.to_dict() for ev in r.evals]}


# ---- the sections' own pieces ----------------------------------------------------------------------

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
        if settings.aa_after_pgd:
            parts.append("AutoAttack ran only on the points PGD left standing (as AutoAttack chains its own attacks), "
                         "so 'AA' is the worst case of PGD and AutoAttack; how often PGD alone breaks a point that "
                         "AutoAttack would leave standing is not measured.")
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
