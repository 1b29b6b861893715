"""Run a declarative experiment: train every row, evaluate, build the paper's table with our
number beside the paper's in every cell that has one.

Columns: ``test`` (clean accuracy), attack columns averaged over the ε grid (``rand``, ``PGD``,
``T-PGD``, ``FGSM``), transfer columns ``←ROW``, ``ρ`` (DeepFool), and the LRC columns of the
SGR paper's long-range-correlated noise attack at the one strength ``[lrc] eps`` of the
experiment file, worst-of-``samples``:

- ``LRC ζ=Z``: ξ ~ N(0, Σ_LRC) with decay length Z pixels (:mod:`gradreg.attacks.lrc`), unit
  marginal variance times s, where ``[lrc] scale = "unit"`` gives s = 1 (SPEC §3) and
  ``"data"`` gives s = σ_data, the square root of the training inputs' mean per-pixel variance
  (Σ_LRC standardized to the data's marginal variance, as SGR standardizes its Σ; our reading);
- ``LRC Σ=data``: ξ ~ N(0, Σ_data), the empirical covariance of the training inputs used as
  Σ_LRC (our reading of the paper's "data covariance as Σ_LRC"; same mean noise power ε²·σ²_data
  as the data-scaled ζ columns).
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import experiments
from .config import TrainConfig, apply_overrides
from .data import DataBundle
from .data import load as load_data
from .harness import (
    EvalSettings,
    ModelEval,
    evaluate_model,
    lrc_covariance_curve,
    lrc_curves,
    lrc_data_factor,
    lrc_data_std,
    masking_checks,
    transfer_matrix,
)
from .report import fmt, markdown_table, plot_curves, plot_matrix, write_csv, write_json
from .runs import load_run
from .train import train

# a column name → which attack's grid average it shows (transfer columns are "←ROW")
# T-PGD: the multi-target reading, the one that puts the SGR paper's T-PGD below its PGD (see
# gradreg.attacks.gradient)
ATTACK_COLUMNS = {"rand": "uniform", "PGD": "pgd", "T-PGD": "tpgd-all", "FGSM": "fgsm"}
DATA_LABELS = {"mnist10k": "MNIST-10k (8,000 train / 2,000 test from the MNIST test set)",
               "digits": "scikit-learn digits (8×8)", "mnist": "MNIST", "cifar10": "CIFAR-10",
               "fashion-mnist": "Fashion-MNIST", "cifar100": "CIFAR-100"}

LRC_DATA_COLUMN = "LRC Σ=data"
_LRC_ZETA_COLUMN = re.compile(r"^LRC ζ=([0-9.]+)$")
LRC_SCALES = ("unit", "data")

TRAIN_KEYS = {"data", "data_dir", "model", "epochs", "batch_size", "lr", "optimizer", "schedule", "momentum",
              "weight_decay", "augment", "seed", "model_params", "lr_milestones", "lr_gamma", "device"}


@dataclass
class RowResult:
    name: str
    method: str
    eval: ModelEval
    train_seconds: float
    test_accuracy: float
    transfer: dict[str, float] = field(default_factory=dict)  # source row → grid-average accuracy
    lrc: dict[str, float] = field(default_factory=dict)  # LRC column → accuracy at the experiment's ε


@dataclass
class LRCSettings:
    """The LRC columns' protocol: strength ``eps``, worst-of-``samples``, noise scale s."""

    eps: float
    samples: int
    scale: str
    marginal_std: float = 1.0  # s, resolved against the data set by :meth:`resolve`
    factor: torch.Tensor | None = None  # F with F·Fᵀ = Σ_data, for the "LRC Σ=data" column

    @classmethod
    def declared(cls, exp: experiments.Experiment, budget: dict[str, Any]) -> LRCSettings:
        """From the experiment's ``[lrc]`` table; a budget's ``lrc_samples`` overrides ``samples``."""
        lrc = exp.lrc
        if "eps" not in lrc:
            raise ValueError(f"experiment {exp.name!r} has LRC columns but no [lrc] eps")
        scale = str(lrc.get("scale", "unit"))
        if scale not in LRC_SCALES:
            raise ValueError(f"experiment {exp.name!r}: [lrc] scale must be one of {LRC_SCALES}, got {scale!r}")
        samples = int(budget.get("lrc_samples", lrc.get("samples", 100)))
        if samples < 1:
            raise ValueError(f"experiment {exp.name!r}: LRC samples must be ≥ 1, got {samples}")
        return cls(eps=float(lrc["eps"]), samples=samples, scale=scale)

    def resolve(self, bundle: DataBundle, columns: list[str]) -> LRCSettings:
        """Compute what depends on the data: s for ``scale="data"``, Σ_data's factor if needed."""
        self.marginal_std = lrc_data_std(bundle) if self.scale == "data" else 1.0
        if LRC_DATA_COLUMN in columns:
            self.factor = lrc_data_factor(bundle)
        return self


def lrc_column(column: str) -> float | str | None:
    """``"LRC ζ=4"`` → 4.0, ``"LRC Σ=data"`` → ``"data"``, any other column → None."""
    if column == LRC_DATA_COLUMN:
        return "data"
    match = _LRC_ZETA_COLUMN.match(column)
    return float(match.group(1)) if match else None


def lrc_cells(model: Any, bundle: DataBundle, columns: list[str], lrc: LRCSettings,
              settings: EvalSettings) -> dict[str, float]:
    """Accuracy at ``lrc.eps`` for every LRC column of ``columns``."""
    zetas = {c: z for c in columns if isinstance(z := lrc_column(c), float)}
    out: dict[str, float] = {}
    if zetas:
        curves = lrc_curves(model, bundle, zetas=list(zetas.values()), eps=[lrc.eps], samples=lrc.samples,
                            settings=settings, marginal_std=lrc.marginal_std)
        out.update({c: curves[z][0] for c, z in zetas.items()})
    if LRC_DATA_COLUMN in columns:
        assert lrc.factor is not None  # LRCSettings.resolve computes it when this column is asked for
        out[LRC_DATA_COLUMN] = lrc_covariance_curve(model, bundle, factor=lrc.factor, eps=[lrc.eps],
                                                    samples=lrc.samples, settings=settings)[0]
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def row_config(exp: experiments.Experiment, row: experiments.Row, budget: dict[str, Any], out: Path,
               data_dir: str | None) -> TrainConfig:
    cfg = TrainConfig(method=row.method, lam=row.lam, task_weight=row.task_weight, penalty=dict(row.penalty),
                      out=str(out / "runs" / row.slug), quiet=True)
    apply_overrides(cfg, {k: v for k, v in budget.items() if k in TRAIN_KEYS})
    apply_overrides(cfg, row.train)
    if data_dir:
        cfg.data_dir = data_dir
    return cfg.validate()


def run_experiment(name: str, *, budget_name: str, out: Path, data_dir: str | None = None,
                   rows: list[str] | None = None, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Train (or reuse finished runs in ``out/runs``), evaluate and write ``out/report.md``."""
    exp = experiments.load(name)
    budget = exp.budget(budget_name)
    chosen = [r for r in exp.rows if rows is None or r.name in rows or r.slug in rows]
    if rows is not None and len(chosen) != len(rows):
        known = ", ".join(r.name for r in exp.rows)
        raise ValueError(f"unknown rows in {rows} (experiment {name!r} has: {known})")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    trained: dict[str, tuple[Any, dict[str, Any]]] = {}
    for i, row in enumerate(chosen, 1):
        cfg = row_config(exp, row, budget, out, data_dir)
        run_dir = Path(cfg.out)
        if not (run_dir / "model.safetensors").exists():
            log(f"[{i}/{len(chosen)}] training {row.name} ({row.method}) on {cfg.data}, {cfg.epochs} epochs")
            cfg.quiet = False
            train(cfg, resume=True, log=lambda s: None)
        else:
            log(f"[{i}/{len(chosen)}] {row.name}: reusing {run_dir}")
        loaded = load_run(run_dir, device=cfg.device)
        trained[row.name] = (loaded, loaded.metrics)
    bundle = load_data(budget["data"], data_dir=data_dir)
    settings = EvalSettings(norm=exp.norm, attacks=tuple(a for a in ("pgd", "tpgd-all", "uniform", "fgsm")
                                                          if any(ATTACK_COLUMNS.get(c) == a for c in exp.columns)),
                            pgd_steps=int(budget.get("pgd_steps", 40)), n_test=budget.get("n_test"),
                            deepfool="ρ" in exp.columns, seed=int(budget.get("seed", 0)))
    lrc_cols = [c for c in exp.columns if lrc_column(c) is not None]
    lrc = LRCSettings.declared(exp, budget).resolve(bundle, lrc_cols) if lrc_cols else None
    results: dict[str, RowResult] = {}
    for i, row in enumerate(chosen, 1):
        loaded, metrics = trained[row.name]
        log(f"[{i}/{len(chosen)}] evaluating {row.name}")
        ev = evaluate_model(loaded.model, bundle, settings, name=row.name, progress=False)
        results[row.name] = RowResult(row.name, row.method, ev, metrics.get("train_seconds", float("nan")),
                                      metrics.get("test_accuracy", ev.clean))
        if lrc is not None:
            results[row.name].lrc = lrc_cells(loaded.model, bundle, lrc_cols, lrc, settings)
    sources = [s for s in exp.transfer_sources if s in trained]
    matrix: dict[str, dict[str, list[float]]] = {}
    if sources:
        log(f"transfer attacks from {', '.join(sources)}")
        matrix = transfer_matrix({n: trained[n][0].model for n in results}, bundle, settings, sources=sources)
        for target, res in results.items():
            res.transfer = {s: sum(matrix[s][target]) / len(matrix[s][target]) for s in sources}
            others = {s: matrix[s][target] for s in sources if s != target}
            res.eval.checks = masking_checks(res.eval, tolerance=settings.tolerance, transfer=others)
    for res in results.values():
        for c in res.eval.checks:
            if not c.passed:
                print(f"WARNING [{res.name}] gradient-masking check failed: {c.name}: {c.detail}", file=sys.stderr)
    summary = write_report(exp, budget_name, budget, results, matrix, out, settings,
                           elapsed=time.perf_counter() - started, lrc=lrc)
    return summary


def cell(res: RowResult, column: str) -> float | None:
    if column == "test":
        return res.eval.clean
    if column in ATTACK_COLUMNS:
        attack = ATTACK_COLUMNS[column]
        return res.eval.average(attack) if attack in res.eval.curves else None
    if column.startswith("←"):
        return res.transfer.get(column[1:])
    if column == "ρ":
        return res.eval.rho
    if lrc_column(column) is not None:
        return res.lrc.get(column)
    raise ValueError(f"unknown column {column!r}")


def describe_columns(exp: experiments.Experiment, settings: EvalSettings, grid: list[float],
                     lrc: LRCSettings | None, data_label: str) -> str:
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
    if has["transfer"]:
        parts.append("'←M' is PGD transferred from the model of row M.")
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
    parts.append("Cost is training time relative to clean training.")
    return " ".join(parts)


def write_report(exp: experiments.Experiment, budget_name: str, budget: dict[str, Any], results: dict[str, RowResult],
                 matrix: dict[str, dict[str, list[float]]], out: Path, settings: EvalSettings, *,
                 elapsed: float, lrc: LRCSettings | None = None) -> dict[str, Any]:
    data = budget["data"]
    clean_time = next((r.train_seconds for r in results.values() if r.method == "clean"), None)
    header = ["method", *exp.columns, "cost ×clean", "checks"]
    rows, raw_rows = [], []
    for name, res in results.items():
        paper = exp.paper.get(name, [])
        cells = []
        for j, col in enumerate(exp.columns):
            ours = cell(res, col)
            theirs = paper[j] if j < len(paper) else None
            pct = col != "ρ"
            text = fmt(ours, percent=pct)
            if theirs is not None:
                text += f" ({theirs:.1f})" if pct else f" ({theirs:.3f})"
            cells.append(text)
        cost = res.train_seconds / clean_time if clean_time else None
        failed = [c.name for c in res.eval.checks if not c.passed]
        rows.append([name, *cells, f"{cost:.1f}×" if cost else "–", "ok" if not failed else "⚠ " + "; ".join(failed)])
        raw_rows.append([name, *[cell(res, c) for c in exp.columns], res.train_seconds])
    table = markdown_table(header, rows)
    grid = settings.grid(data)
    data_label = DATA_LABELS.get(data, data)
    lines = [
        f"# {exp.title}", "",
        f"Experiment `{exp.name}`, budget `{budget_name}`: trained and evaluated on **{data_label}**"
        + (f"; the paper's numbers (in parentheses) are on {exp.paper_data}, so they are a reference, not a like-for-like "
           "comparison" if exp.paper_data and data not in exp.paper_data.lower() else "") + ".",
        "",
        describe_columns(exp, settings, grid, lrc, data_label), "",
        table, "",
        f"Budget: {json.dumps(budget)}. Total time {elapsed / 60:.1f} min on {torch.get_num_threads()} threads.", "",
    ]
    if exp.note:
        lines += [exp.note, ""]
    pgd_curves = {n: (r.eval.eps, r.eval.curves["pgd"]) for n, r in results.items() if "pgd" in r.eval.curves}
    if pgd_curves:
        plot_curves(out / "pgd.png", pgd_curves, title=f"PGD accuracy vs ε ({data})", xlabel="ε (input units)")
        lines.append("![PGD accuracy](pgd.png)")
    zeta_cols = [(c, z) for c in exp.columns if isinstance(z := lrc_column(c), float)]
    if lrc is not None and zeta_cols:
        lrc_plot = {n: ([z for _, z in zeta_cols], [r.lrc.get(c, math.nan) for c, _ in zeta_cols])
                    for n, r in results.items()}
        plot_curves(out / "lrc.png", lrc_plot, title=f"LRC worst-of-{lrc.samples}, ε = {lrc.eps:g} ({data})",
                    xlabel="decay length ζ (pixels)", logx=True)
        lines.append("![LRC accuracy](lrc.png)")
    if matrix:
        names = list(results)
        srcs = list(matrix)
        avg = [[sum(matrix[s][t]) / len(matrix[s][t]) for t in names] for s in srcs]
        plot_matrix(out / "transfer.png", avg, rows=srcs, cols=names, title="PGD transfer accuracy (avg over ε)",
                    xlabel="target", ylabel="source")
        lines.append("![transfer](transfer.png)")
    lines += ["", "## Gradient-masking checks", ""]
    for res in results.values():
        for c in res.eval.checks:
            lines.append(f"- {res.name}: {'ok' if c.passed else '**FAILED**'} — {c.name} ({c.detail})")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_csv(out / "table.csv", ["method", *exp.columns, "train_seconds"], raw_rows)
    summary = {"experiment": exp.name, "budget": budget_name, "data": data, "columns": exp.columns,
               "rows": {n: {"cells": dict(zip(exp.columns, [cell(r, c) for c in exp.columns])),
                            "train_seconds": r.train_seconds, "eval": r.eval.to_dict()} for n, r in results.items()},
               "paper": exp.paper, "transfer": matrix, "table_markdown": table}
    if lrc is not None:
        summary["lrc"] = {"eps": lrc.eps, "samples": lrc.samples, "scale": lrc.scale,
                          "marginal_std": lrc.marginal_std}
    write_json(out / "results.json", summary)
    print(table)
    print(f"report: {out / 'report.md'}")
    return summary
