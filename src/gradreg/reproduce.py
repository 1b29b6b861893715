"""Run a declarative experiment: train every row, evaluate, build the paper's table with our
number beside the paper's in every cell that has one."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import experiments
from .config import TrainConfig, apply_overrides
from .data import load as load_data
from .harness import EvalSettings, ModelEval, evaluate_model, masking_checks, transfer_matrix
from .report import fmt, markdown_table, plot_curves, plot_matrix, write_csv, write_json
from .runs import load_run
from .train import train

# a column name → which attack's grid average it shows (transfer columns are "←ROW")
ATTACK_COLUMNS = {"rand": "uniform", "PGD": "pgd", "T-PGD": "tpgd", "FGSM": "fgsm"}
DATA_LABELS = {"mnist10k": "MNIST-10k (8,000 train / 2,000 test from the MNIST test set)",
               "digits": "scikit-learn digits (8×8)", "mnist": "MNIST", "cifar10": "CIFAR-10",
               "fashion-mnist": "Fashion-MNIST", "cifar100": "CIFAR-100"}

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
    settings = EvalSettings(norm=exp.norm, attacks=tuple(a for a in ("pgd", "tpgd", "uniform", "fgsm")
                                                          if any(ATTACK_COLUMNS.get(c) == a for c in exp.columns)),
                            pgd_steps=int(budget.get("pgd_steps", 40)), n_test=budget.get("n_test"),
                            deepfool="ρ" in exp.columns, seed=int(budget.get("seed", 0)))
    results: dict[str, RowResult] = {}
    for i, row in enumerate(chosen, 1):
        loaded, metrics = trained[row.name]
        log(f"[{i}/{len(chosen)}] evaluating {row.name}")
        ev = evaluate_model(loaded.model, bundle, settings, name=row.name, progress=False)
        results[row.name] = RowResult(row.name, row.method, ev, metrics.get("train_seconds", float("nan")),
                                      metrics.get("test_accuracy", ev.clean))
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
                           elapsed=time.perf_counter() - started)
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
    raise ValueError(f"unknown column {column!r}")


def write_report(exp: experiments.Experiment, budget_name: str, budget: dict[str, Any], results: dict[str, RowResult],
                 matrix: dict[str, dict[str, list[float]]], out: Path, settings: EvalSettings, *,
                 elapsed: float) -> dict[str, Any]:
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
        f"Accuracies in %, averaged over the ε grid {{{', '.join(f'{e * 255:.3g}/255' for e in grid)}}} "
        f"({exp.norm}); PGD-{settings.pgd_steps} with random start on the predicted label; "
        f"{'all' if settings.n_test is None else f'the first {settings.n_test}'} test points. "
        "'←M' is PGD transferred from the model of row M; ρ is DeepFool's mean ‖r‖₂/‖x‖₂. "
        "Cost is training time relative to clean training.", "",
        table, "",
        f"Budget: {json.dumps(budget)}. Total time {elapsed / 60:.1f} min on {torch.get_num_threads()} threads.", "",
    ]
    if exp.note:
        lines += [exp.note, ""]
    pgd_curves = {n: (r.eval.eps, r.eval.curves["pgd"]) for n, r in results.items() if "pgd" in r.eval.curves}
    if pgd_curves:
        plot_curves(out / "pgd.png", pgd_curves, title=f"PGD accuracy vs ε ({data})", xlabel="ε (input units)")
        lines.append("![PGD accuracy](pgd.png)")
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
    write_json(out / "results.json", summary)
    print(table)
    print(f"report: {out / 'report.md'}")
    return summary
