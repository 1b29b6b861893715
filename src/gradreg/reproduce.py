"""Run a declarative experiment (``gradreg reproduce``): tune, train, evaluate, report.

Read top to bottom, this module is the run in the order it happens:

1. **A row's training** — :func:`row_config` turns an experiment row and a budget into a
   :class:`~gradreg.config.TrainConfig`; :func:`row_folder` names its folder (a sweep point's
   folder is :func:`gradreg.sweep.run_name`'s: method, λ and a hash of its whole configuration).
2. **λ** — rows with a ``lams`` grid are tuned on a validation split of the training data:
   :func:`sweep_base` is the sweep's training, :func:`tuning_state` reads how far a row's
   sweep (and its widening, :mod:`gradreg.widen`) has come from its run folders alone, and
   :func:`tune_rows` trains the unfinished points in waves through a
   :class:`~gradreg.runner.Runner`; rows with ``lam_from`` borrow a tuned λ
   (:func:`borrowed_lams`).
3. **The evaluation every row gets** — :func:`eval_settings` (PGD, AutoAttack at the training
   ε with :func:`autoattack_settings`, the raw ε curve, the Square audit of the
   gradient-penalty rows, :func:`audited`).
4. **The run** — :func:`run_experiment` plans every (row, seed) training
   (:func:`plan_trainings`), trains the unfinished ones (parallel one-thread workers, or
   printed as commands for a scheduler), evaluates every model with cached, resumable
   protocols (:mod:`gradreg.protocols`), adds transfer, step costs (:func:`step_costs`), norms
   (:func:`row_norms`) and the monitor's record (:func:`monitor_record`), and hands the results
   to :func:`gradreg.experiment_report.write_report`.
5. **Re-rendering** — :func:`report_only` rebuilds the report from a finished folder's
   ``results.json`` without training or attacking.

The result model and the table's columns are :mod:`gradreg.tables`; the report's sections are
:mod:`gradreg.experiment_report`.

Length (≈ 640 lines, over the project's 500): these five steps are one procedure whose parts
share the experiment, the budget and the output folder; each step is a few small functions in
the order above, and splitting them over more files would make a newcomer jump between modules
to follow one run (our choice, after moving the result model and the report out).
"""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import experiments
from .config import TrainConfig, apply_overrides, parse_term
from .data import DataBundle
from .data import load as load_data
from .cost import StepCost, floor_at_clean, interleaved_costs, training_step
from .monitor import run_record
from .protocols import (
    EvalSettings,
    ModelEval,
    cached_evaluation,
    fingerprint,
    lrc_covariance_curve,
    lrc_curves,
    masking_checks,
    transfer_flags,
    unbits,
)
from .runs import load_run
from .threat import parse_eps
from .runner import EvalJob, Runner, default_jobs, is_evaluated, is_trained
from .sweep import (DEFAULT_VALIDATION_FRACTION, SweepPoint, SweepResult, SweepRow, SweepSpec, gather, is_finished,
                    sweep_points, write_records)
from .widen import LamScore, decide, hard_limits
from .tables import ATTACK_COLUMNS, LRC_DATA_COLUMN, LamChoice, LRCSettings, Reuse, RowResult, lrc_column
from .experiment_report import ReportInput, write_report


TRAIN_KEYS = {"data", "data_dir", "model", "epochs", "batch_size", "lr", "optimizer", "schedule", "momentum",
              "weight_decay", "augment", "seed", "model_params", "lr_milestones", "lr_gamma", "device",
              "augment_kind", "augment_pad", "standardize"}  # the SGR paper's preprocessing, per budget


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
               data_dir: str | None, *, seed: int | None = None, run_name: str | None = None) -> TrainConfig:
    """The row's training config; ``seed`` overrides the budget's, ``run_name`` the run folder."""
    cfg = TrainConfig(method=row.method, lam=row.lam, task_weight=row.task_weight, penalty=dict(row.penalty),
                      out=str(out / "runs" / (run_name or row.slug)), quiet=True)
    apply_overrides(cfg, {k: v for k, v in budget.items() if k in TRAIN_KEYS})
    apply_overrides(cfg, row.train)
    if seed is not None:
        apply_overrides(cfg, {"seed": seed})
    if data_dir:
        cfg.data_dir = data_dir
    return cfg.validate()


def row_folder(row: experiments.Row, seed: int, *, default_seed: int | None) -> str:
    """Run folder of a row at a seed: the row's slug for the budget's own seed when no seeds are
    asked for (so earlier outputs are reused), ``slug-sSEED`` otherwise; a tuned row's folder
    also names its λ (``slug-lamΛ``), so a run trained at another λ is never reused.

    Two naming schemes on purpose (our choice): a sweep point's folder is content-addressed
    (:func:`gradreg.sweep.run_name`: method, λ and a hash of the whole configuration), since one
    sweep spans many configurations that must never share a folder; a table row's folder stays
    readable, since people open it, and the runner refuses one whose stored configuration is
    not the planned one (:func:`gradreg.runner.stale_fields`), so a readable name never hides a
    stale model."""
    value = row.tuned_value
    slug = row.slug if not row.lams or value is None else f"{row.slug}-lam{value:g}"
    return slug if seed == default_seed else f"{slug}-s{seed}"


def sweep_grid(lams: list[float], points: int | None) -> list[float]:
    """``points`` evenly spaced values of a λ grid, ends included (1: the middle one; None: all)."""
    if points is None or points >= len(lams):
        return list(lams)
    if points < 1:
        raise ValueError(f"sweep_points must be ≥ 1, got {points}")
    if points == 1:
        return [lams[(len(lams) - 1) // 2]]
    return [lams[round(i * (len(lams) - 1) / (points - 1))] for i in range(points)]


def sweep_settings(budget: dict[str, Any]) -> dict[str, Any]:
    """The budget's sweep keys with their defaults: ``widen`` (False), ``max_widen`` (3),
    ``sweep_seeds`` (the budget's seed), ``sweep_margin_points`` (1 with widening or several
    seeds, else 0: the rule as it was), ``sweep_rule``, ``sweep_tolerance_points``."""
    widen = bool(budget.get("widen", False))
    seeds = [int(v) for v in budget.get("sweep_seeds", [])] or [int(budget.get("seed", 0))]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"sweep_seeds must be distinct, got {seeds}")
    margin = float(budget.get("sweep_margin_points", 1.0 if widen or len(seeds) > 1 else 0.0))
    max_widen = int(budget.get("max_widen", 3))
    if margin < 0 or max_widen < 0:
        raise ValueError(f"sweep_margin_points and max_widen must be ≥ 0, got {margin} and {max_widen}")
    return {"widen": widen, "max_widen": max_widen if widen else 0, "seeds": seeds, "margin": margin,
            "rule": str(budget.get("sweep_rule", "within-clean")),
            "tolerance": float(budget.get("sweep_tolerance_points", 1.0))}


def sweep_base(exp: experiments.Experiment, row: experiments.Row, budget: dict[str, Any], out: Path,
               data_dir: str | None) -> TrainConfig:
    """A tuned row's training config on the validation split, scored by PGD at the training ε, or
    (``[tune] attack = "lrc"``) by worst-of-k LRC noise at the ``[lrc]`` strength and ``lrc_zeta``."""
    base = row_config(exp, row, budget, out / "sweeps", data_dir)
    fraction = float(budget.get("sweep_validation_fraction", DEFAULT_VALIDATION_FRACTION))
    if exp.tune.get("attack", "pgd") == "lrc":
        lrc = LRCSettings.declared(exp, budget)  # the LRC columns' strength, worst-of-k and scale
        apply_overrides(base, {"validation_fraction": fraction, "validation_eps": lrc.eps, "validation_attack": "lrc",
                               "validation_lrc_zeta_px": float(exp.tune.get("lrc_zeta", 8.0)),
                               "validation_lrc_samples": lrc.samples, "validation_lrc_scale": lrc.scale})
    else:
        if exp.autoattack_eps is None:
            raise ValueError(f"experiment {exp.name!r}: tuning λ of {row.name!r} needs the training ε (autoattack_eps)")
        apply_overrides(base, {"validation_fraction": fraction,
                               "validation_eps": float(exp.autoattack_eps), "validation_norm": exp.norm,
                               "validation_pgd_steps": int(budget.get("sweep_pgd_steps", budget.get("pgd_steps", 20)))})
    if budget.get("sweep_epochs") is not None:
        # brief sweeps (our choice, a cut stated by each budget that takes it): λ is ranked after
        # fewer epochs than the table's trainings, with the learning-rate schedule compressed to them
        apply_overrides(base, {"epochs": int(budget["sweep_epochs"])})
    return base.validate()


@dataclass
class RowTuning:
    """Where a row's tuning stands, read from its run folders alone (so that an interrupted or
    externally scheduled run resumes where it was): its grid, widened as far as the finished
    points say, every point of it, and the choice once no point is unfinished."""

    grid: list[float]
    points: list[SweepPoint]
    choice: LamChoice | None


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None) / len(values)


def _seed_means(results: list[SweepResult], seeds: list[int]) -> SweepResult:
    """One sweep table whose accuracies are the means over the validation seeds' tables."""
    first = results[0]

    def mean_row(rows: list[SweepRow]) -> SweepRow:
        done = all(r.status == "done" for r in rows)
        return SweepRow(name=rows[0].name + (f" (+{len(rows) - 1} seeds)" if len(rows) > 1 else ""), role=rows[0].role,
                        lam=rows[0].lam, eps=rows[0].eps, status="done" if done else "pending",
                        clean_accuracy=_mean([r.clean_accuracy for r in rows]), pgd_accuracy=_mean([r.pgd_accuracy for r in rows]),
                        train_seconds=_mean([r.train_seconds for r in rows]), run_dir=rows[0].run_dir,
                        note=f"mean over seeds {', '.join(map(str, seeds))}" if len(rows) > 1 else "")

    rows = [mean_row([r.rows[i] for r in results]) for i in range(len(first.rows))]
    return SweepResult(spec=first.spec, rule=first.rule, tolerance_points=first.tolerance_points,
                       reference=mean_row([r.reference for r in results]), rows=rows, chosen=None, reason="",
                       extra={"seeds": seeds})


def tuning_state(exp: experiments.Experiment, row: experiments.Row, budget: dict[str, Any], out: Path,
                 data_dir: str | None) -> RowTuning:
    """The row's :class:`RowTuning`; once its grid is decided, writes ``out/sweeps/<row>/sweep.*``."""
    settings = sweep_settings(budget)
    if row.sweep_rule:  # the row states a rule of its own (its note says why)
        settings["rule"] = row.sweep_rule
    base = sweep_base(exp, row, budget, out, data_dir)
    grid = sweep_grid(row.lams, budget.get("sweep_points"))
    limits = hard_limits(row.method, row.penalty, stated_max=row.lam_max)
    record = out / "sweeps" / row.slug
    where = str(record.relative_to(out))
    for rounds_left in range(settings["max_widen"], -1, -1):
        specs = [SweepSpec(base=replace(base, seed=seed, penalty=dict(base.penalty)).validate(), lams=grid,
                           out=out / "sweeps", rule=settings["rule"], tolerance_points=settings["tolerance"],
                           lam_key=row.lam_key)
                 for seed in settings["seeds"]]
        per_seed = [sweep_points(spec) for spec in specs]
        points = [p for pts in per_seed for p in pts]
        if not all(is_finished(p) for p in points):
            return RowTuning(grid, points, None)
        results = [gather(spec, pts) for spec, pts in zip(specs, per_seed)]
        if not settings["widen"] and len(specs) == 1 and settings["margin"] == 0:  # the sweep's own rule
            result = results[0]
            write_records(result, record)
            rule = f"rule {result.rule}: {result.reason}"
            curve = tuple((float(r.lam or 0.0), float(r.clean_accuracy or 0.0), float(r.pgd_accuracy or 0.0))
                          for r in sorted(result.rows, key=lambda r: r.lam or 0.0) if r.status == "done")
            if result.chosen is not None:
                return RowTuning(grid, points, LamChoice(result.chosen.lam, "sweep", rule, tuple(grid), where, curve=curve))
            return RowTuning(grid, points, LamChoice(row.tuned_value, "declared (sweep chose none)", rule, tuple(grid), where,
                                                     curve=curve))
        table = _seed_means(results, settings["seeds"])
        scores = [LamScore(float(r.lam or 0.0), r.clean_accuracy, r.pgd_accuracy, len(specs)) for r in table.rows]
        ref = LamScore(0.0, table.reference.clean_accuracy, table.reference.pgd_accuracy, len(specs))
        decision = decide(scores, ref, rule=settings["rule"], tolerance_points=settings["tolerance"],
                          margin_points=settings["margin"], limits=limits, rounds_left=rounds_left)
        if decision.widen:
            grid = sorted(set(grid) | set(decision.widen))
            continue
        table.chosen = next((r for r in table.rows if decision.chosen is not None and r.lam == decision.chosen), None)
        table.reason = decision.reason
        table.spec = {**table.spec, "lams": list(grid)}
        table.extra.update(stop=decision.stop, margin_points=settings["margin"], widen=settings["widen"],
                           max_widen=settings["max_widen"], initial_grid=sweep_grid(row.lams, budget.get("sweep_points")),
                           upper_limit=None if math.isinf(limits.upper) else limits.upper,
                           upper_limit_reason=limits.upper_reason)
        write_records(table, record)
        seeds = settings["seeds"]
        detail = (f"{decision.reason} (validation seeds {', '.join(map(str, seeds))}; "
                  + (f"the row's rule {row.sweep_rule}; " if row.sweep_rule else "") + "gradreg.widen"
                  + (f", stop: {decision.stop}" if decision.stop else "") + ")")
        curve = tuple((s.lam, float(s.clean or 0.0), float(s.pgd or 0.0)) for s in sorted(scores, key=lambda s: s.lam))
        source = "sweep" if decision.chosen is not None else "declared (sweep chose none)"
        lam = decision.chosen if decision.chosen is not None else row.tuned_value
        return RowTuning(grid, points, LamChoice(lam, source, detail, tuple(grid), where, decision.stop, curve))
    raise AssertionError("unreachable: the last round has no rounds left to widen")


def borrowed_lams(rows: list[experiments.Row], tuning: dict[str, LamChoice]) -> dict[str, LamChoice]:
    """The λ of every row with ``lam_from``: its lender's tuned λ (the lender's grid and record
    shown beside it); rows whose lender is still undecided are left out."""
    choices = {}
    for row in rows:
        if not row.lam_from:
            continue
        lender = tuning.get(row.lam_from)
        if lender is None or not lender.grid:
            if lender is not None:
                raise ValueError(f"row {row.name!r} takes its λ from {row.lam_from!r}, which has no λ grid")
            continue
        choices[row.name] = LamChoice(lender.lam, f"from {row.lam_from}",
                                      f"the λ tuned for {row.lam_from}: no sweep of its own (a cut the budget states)",
                                      lender.grid, lender.record)
    return choices


def tune_rows(exp: experiments.Experiment, rows: list[experiments.Row], budget: dict[str, Any], out: Path,
              data_dir: str | None, log: Callable[[str], None], reuse: Reuse | None = None, *,
              runner: Runner | None = None) -> dict[str, LamChoice]:
    """Every row's λ: for a row with a grid (``lams``), ``gradreg sweep``'s choice on a validation
    split carved from the training data (its rule, ``sweep_rule`` / ``sweep_tolerance_points``
    of the budget, validation PGD at the training ε), widened beyond an end when the budget says
    ``widen`` (:func:`tuning_state`, :mod:`gradreg.widen`); the declared λ if it has no grid or
    the rule picks none. The sweeps share ``out/sweeps/runs`` (rows with the same training
    settings share their clean reference run) and write ``out/sweeps/<row>/sweep.{md,json,png}``.
    Trainings run in waves through ``runner`` (every undecided row's unfinished points at once);
    a printing runner stops after the first wave, and rows still undecided are left out."""
    runner = runner or Runner(jobs=1, log=log)
    choices = {r.name: LamChoice(r.lam, "declared", "no λ grid: the λ of the row's protocol") for r in rows if not r.lams}
    while True:
        states = {r.name: tuning_state(exp, r, budget, out, data_dir) for r in rows if r.name not in choices}
        for state in states.values():
            for point in state.points:
                if reuse is not None:
                    reuse.training(point.run_dir, done=is_finished(point))
        choices.update({name: st.choice for name, st in states.items() if st.choice is not None})
        wave = [(f"sweep {name}: {p.name}", p.config) for name, st in states.items() if st.choice is None
                for p in st.points if not is_finished(p)]
        if not wave:
            break
        log(f"λ sweeps: {len(wave)} unfinished point(s) of {sum(st.choice is None for st in states.values())} row(s)")
        runner.run(wave)
        if runner.print_only:
            break
    return {r.name: choices[r.name] for r in rows if r.name in choices}


def twin_seeds(seeds: list[int]) -> list[int]:
    """The seed of each seed's transfer twin: the next seed of the list (cyclically), or seed + 1
    for a single seed — same method, another training seed, never the judged model itself."""
    return [seeds[(i + 1) % len(seeds)] for i in range(len(seeds))] if len(seeds) > 1 else [seeds[0] + 1]


def autoattack_settings(exp: experiments.Experiment, budget: dict[str, Any]) -> dict[str, Any] | None:
    """EvalSettings fields for the AutoAttack column at the experiment's training ε (None: no column)."""
    if exp.autoattack_eps is None:
        return None
    params: dict[str, Any] = {}
    if "aa_attacks" in budget:
        params["attacks"] = list(budget["aa_attacks"])
    for key in ("n_iter", "n_queries", "n_restarts"):
        if f"aa_{key}" in budget:
            params[key] = int(budget[f"aa_{key}"])
    version = str(budget.get("aa_version", "custom" if "attacks" in params else "standard"))
    return {"autoattack": True, "aa_eps": [float(exp.autoattack_eps)], "aa_version": version,
            "aa_n": budget.get("aa_n"), "aa_params": params, "aa_after_pgd": bool(budget.get("aa_after_pgd", False))}


# rows whose robustness rests on a penalty of the input gradient, the Jacobian, the curvature or
# the local linearity of the loss (or an added term of that kind): the ones a gradient-free audit
# must check for masked gradients (our list)
GRADIENT_PENALTY_METHODS = frozenset({"datagrad", "lyu", "gn", "igr", "sgr", "opnorm", "arr", "trades", "gradalign",
                                      "cure", "llr", "elle", "elle-a", "jacreg"})


def audited(row: experiments.Row) -> bool:
    """Whether the row's objective holds a gradient penalty (its method or an added term)."""
    added = row.train.get("add", [])  # [{method = ..., ...}] or "NAME:key=value" strings
    names = [(parse_term(t) if isinstance(t, str) else t)["method"] for t in added]
    return row.method in GRADIENT_PENALTY_METHODS or any(n in GRADIENT_PENALTY_METHODS for n in names)


def eval_settings(exp: experiments.Experiment, budget: dict[str, Any]) -> EvalSettings:
    """The evaluation every row of the budget gets. A budget's ``curve_eps`` (3–5 radii) adds a
    raw PGD ε curve (every radius attacked afresh, the masking check "accuracy falls with ε")
    even when the experiment has no PGD column; ``square_n`` and ``square_queries`` set the
    gradient-free audit, which :func:`_run_experiment` runs on the gradient-penalty rows."""
    attacks = tuple(a for a in ("pgd", "tpgd-all", "tpgd", "uniform", "fgsm") if any(ATTACK_COLUMNS.get(c) == a for c in exp.columns))
    curve = [float(e) for e in budget.get("curve_eps", [])]
    if curve and "pgd" not in attacks:
        attacks = ("pgd", *attacks)
    aa = autoattack_settings(exp, budget)
    settings = EvalSettings(norm=exp.norm, attacks=attacks, pgd_steps=int(budget.get("pgd_steps", 40)),
                            pgd_restarts=int(budget.get("pgd_restarts", 1)), n_test=budget.get("n_test"),
                            deepfool="ρ" in exp.columns, seed=int(budget.get("seed", 0)),
                            square_queries=int(budget.get("square_queries", 1000)), eps=eval_grid(budget), **(aa or {}))
    if curve:
        if "PGD" in exp.columns:
            raise ValueError(f"experiment {exp.name!r}: curve_eps would replace the PGD column's ε grid")
        settings.eps = curve
    return settings


def curve_only(exp: experiments.Experiment, budget: dict[str, Any]) -> bool:
    """Whether the PGD curve is the masking evidence of ``curve_eps`` only (no PGD column)."""
    return bool(budget.get("curve_eps")) and "PGD" not in exp.columns


def eval_grid(budget: dict[str, Any]) -> list[float] | None:
    """The budget's ``eps_grid`` (the ε of the attack columns' curves; "8/255" style allowed), or
    None for the data set's default grid."""
    return [parse_eps(e) for e in budget["eps_grid"]] if "eps_grid" in budget else None


def plan_trainings(exp: experiments.Experiment, chosen: list[experiments.Row], budget: dict[str, Any], out: Path,
                   data_dir: str | None, seed_list: list[int], naming_default: int | None) -> dict[tuple[str, int], TrainConfig]:
    """Every (row, seed) training of the table, plus the transfer sources' twins (a single seed
    needs its twins trained; with several seeds they exist): independent of each other."""
    # seed-major: a wave cut short (or a scheduler that runs in order) finishes whole seeds first,
    # so a later ``--seeds`` with fewer seeds reuses everything done
    planned = {(row.name, seed): row_config(exp, row, budget, out, data_dir, seed=seed,
                                            run_name=row_folder(row, seed, default_seed=naming_default))
               for seed in seed_list for row in chosen}
    for source in [s for s in exp.transfer_sources if any(r.name == s for r in chosen)]:
        row = next(r for r in chosen if r.name == source)
        for twin in twin_seeds(seed_list):
            if (source, twin) not in planned:
                planned[(source, twin)] = row_config(exp, row, budget, out, data_dir, seed=twin,
                                                     run_name=row_folder(row, twin, default_seed=naming_default))
    return planned


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (None: leave torch's setting), restored after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_experiment(name: str, *, budget_name: str, out: Path, data_dir: str | None = None,
                   rows: list[str] | None = None, seeds: list[int] | None = None,
                   log: Callable[[str], None] = _log, jobs: int | None = None, eval_jobs: int | None = None,
                   print_commands: bool = False, launcher: Sequence[str] | None = None) -> dict[str, Any]:
    """Train (or reuse finished runs in ``out/runs``) every row once per seed, evaluate, and write
    ``out/report.md``. Transfer sources are twins trained with another seed. A budget's
    ``threads`` sets torch's intra-op threads for the whole run (1 for the tiny budgets' small
    models, whose operations are too small to split and slow down when the cores are shared).

    Independent trainings (a wave of sweep points, then every row × seed) run as ``jobs``
    one-thread worker processes (:mod:`gradreg.runner`; default: the budget's ``jobs``, else the
    number of cores, but 1 for a ``tiny`` budget, whose sub-second trainings cost less than a
    worker's start; 1 trains in this process). The evaluations of every row × seed run as
    ``eval_jobs`` one-thread worker processes (default: the budget's ``eval_jobs``, else 1: in
    this process with its threads, which measured as fast or faster on the 2-core machine,
    BENCHMARKS.md; our choice of default). ``print_commands`` trains nothing: it prints the
    next wave's unfinished trainings as resumable shell commands (``launcher`` starts gradreg in
    them) and returns ``{"printed": [...]}``; re-running it after they finish prints the next."""
    budget = experiments.load(name).budget(budget_name)
    runner = Runner(jobs=int(jobs or budget.get("jobs") or (1 if budget_name == "tiny" else default_jobs())),
                    eval_jobs=int(eval_jobs or budget.get("eval_jobs") or 1),
                    print_only=print_commands, launcher=launcher, log=log)
    with torch_threads(budget.get("threads")):
        return _run_experiment(name, budget_name=budget_name, out=out, data_dir=data_dir, rows=rows, seeds=seeds,
                               log=log, runner=runner)


def _run_experiment(name: str, *, budget_name: str, out: Path, data_dir: str | None, rows: list[str] | None,
                    seeds: list[int] | None, log: Callable[[str], None], runner: Runner) -> dict[str, Any]:
    exp = experiments.load(name).for_budget(budget_name)
    budget = exp.budget(budget_name)
    chosen = [r for r in exp.rows if rows is None or r.name in rows or r.slug in rows]
    if rows is not None and len(chosen) != len(rows):
        known = ", ".join(r.name for r in exp.rows)
        raise ValueError(f"unknown rows in {rows} (experiment {name!r} has: {known})")
    default_seed = int(budget.get("seed", 0))
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ValueError(f"--seeds must be distinct, got {seeds}")
    seeds = seeds or [int(v) for v in budget.get("seeds", [])] or None  # --seeds, else the budget's seeds
    seed_list = list(seeds) if seeds else [default_seed]
    naming_default = None if seeds else default_seed
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reuse = Reuse()
    lenders = [r for r in exp.rows if r.name in {c.lam_from for c in chosen} and r not in chosen]
    tuned = [*chosen, *lenders]  # a row with lam_from needs its lender tuned, even when not chosen
    tuning = tune_rows(exp, tuned, budget, out, data_dir, log, reuse, runner=runner) if any(r.lams for r in tuned) else {}
    tuning.update(borrowed_lams(chosen, tuning))
    if runner.print_only:  # rows whose λ is still being tuned cannot be planned yet
        chosen = [r for r in chosen if (r.name in tuning or not r.lams) and (not r.lam_from or r.lam_from in tuning)]
    chosen = [r.at(tuning[r.name].lam) if r.lams or r.lam_from else r for r in chosen]  # every row at its tuned λ
    planned = plan_trainings(exp, chosen, budget, out, data_dir, seed_list, naming_default)
    for cfg in planned.values():
        reuse.training(Path(cfg.out), done=is_trained(cfg))
    runner.run([(f"{row} (seed {seed})", cfg) for (row, seed), cfg in planned.items()])
    if runner.print_only:
        log(f"printed {len(runner.printed)} training command(s); run them, then run this command again "
            "(without --print-commands to evaluate once it prints none)")
        return {"printed": list(runner.printed)}
    trained = {key: load_run(Path(cfg.out), device=cfg.device) for key, cfg in planned.items()}
    sources = [s for s in exp.transfer_sources if any(r.name == s for r in chosen)]
    twins = twin_seeds(seed_list)
    bundle = load_data(budget["data"], data_dir=data_dir)
    aa = autoattack_settings(exp, budget)
    settings = eval_settings(exp, budget)
    square_n = int(budget.get("square_n", 0)) if aa is not None else 0
    lrc_cols = [c for c in exp.columns if lrc_column(c) is not None]
    lrc = LRCSettings.declared(exp, budget).resolve(bundle, lrc_cols) if lrc_cols else None
    eval_jobs = {(row.name, seed): EvalJob(
        label=f"{row.name} (seed {seed})", run_dir=str(planned[(row.name, seed)].out),
        device=planned[(row.name, seed)].device, data=budget["data"], data_dir=data_dir, name=row.name,
        settings=replace(settings, square_n=square_n if audited(row) else 0,
                         aa_cache=str(out / "autoattack" / f"s{seed}") if aa else None),
        cache=str(out / "evaluations" / f"s{seed}" / f"{row.slug}.json")) for row in chosen for seed in seed_list}
    todo = [job for key, job in eval_jobs.items() if not is_evaluated(job, trained[key].model, bundle)]
    fresh = {job.label for job in todo} if runner.evaluate(todo) else set()  # evaluated by workers just now
    results: dict[str, RowResult] = {}
    for i, row in enumerate(chosen, 1):
        res = RowResult(row.name, row.method, [], [], [])
        for seed in seed_list:
            loaded, job = trained[(row.name, seed)], eval_jobs[(row.name, seed)]
            if job.label not in fresh:
                log(f"[{i}/{len(chosen)}] evaluating {row.name}, seed {seed}")
            ev, reused = cached_evaluation(loaded.model, bundle, job.settings, name=row.name, progress=False,
                                           cache=Path(job.cache))
            reused = reused and job.label not in fresh
            reuse.evaluations += 1
            reuse.reused_evaluations += int(reused)
            if reused:
                log(f"[{i}/{len(chosen)}] {row.name}, seed {seed}: reusing its finished evaluation")
            res.evals.append(ev)
            res.train_seconds.append(float(loaded.metrics.get("train_seconds", float("nan"))))
            res.test_accuracy.append(float(loaded.metrics.get("test_accuracy", ev.clean)))
            res.monitor.append(monitor_record(loaded.path, loaded.metrics))
            if lrc is not None:
                res.lrc.append(lrc_cells(loaded.model, bundle, lrc_cols, lrc, settings))
        results[row.name] = res
    provenance: list[dict[str, Any]] = []
    matrix: dict[str, dict[str, list[float]]] = {}
    if sources:
        log(f"transfer attacks from twins of {', '.join(sources)}")
        for k, (seed, twin) in enumerate(zip(seed_list, twins)):
            targets = {n: trained[(n, seed)].model for n in results}
            source_models = {s: trained[(s, twin)].model for s in sources}
            provenance += [{"seed": seed, "source": s, "source_seed": twin,
                            "source_run": str(trained[(s, twin)].path),
                            "source_fingerprint": fingerprint(source_models[s]),
                            "target_fingerprints": {t: fingerprint(m) for t, m in targets.items()}} for s in sources]
            flags = transfer_flags(targets, bundle, settings, sources=sources, source_models=source_models)
            for target, res in results.items():
                for s in sources:
                    res.transfer.setdefault(s, []).append(flags[s][target])
                ev = res.evals[k]
                curves = {s: flags[s][target].double().mean(dim=1).tolist() for s in sources}
                ev.checks = masking_checks(ev, tolerance=settings.tolerance, transfer=curves)
        matrix = {s: {t: [sum(f[e].double().mean().item() for f in results[t].transfer[s]) / len(seed_list)
                          for e in range(len(settings.grid(bundle.name)))] for t in results} for s in sources}
    cost_rounds = int(budget.get("cost_rounds", 0))
    if cost_rounds > 0 and any(r.method == "clean" for r in chosen):
        log(f"step costs: {len(chosen)} methods interleaved, {cost_rounds} rounds")
        costs = step_costs(exp, chosen, budget, out, data_dir, rounds=cost_rounds)
        for row_name, step_cost in costs.items():
            results[row_name].step_cost = step_cost
    norms: dict[str, dict[str, torch.Tensor]] = {}
    if budget.get("norms_n"):  # what each method regularizes, as trained (first seed)
        log(f"per-example gradient and operator norms on {budget['norms_n']} test points")
        norms = row_norms({r.name: trained[(r.name, seed_list[0])].model for r in chosen}, bundle, norm=exp.norm,
                          n=int(budget["norms_n"]), iterations=int(budget.get("norms_iterations", 20)), seed=default_seed)
    for res in results.values():
        for ev in res.evals:
            for c in ev.checks:
                if c.failed:
                    print(f"WARNING [{res.name}] gradient-masking check failed: {c.name}: {c.detail}", file=sys.stderr)
    report = ReportInput(exp, budget_name, budget, results, settings, seeds=seed_list,
                         elapsed_seconds=time.perf_counter() - started, matrix=matrix, lrc=lrc, twins=twins,
                         provenance=provenance, tuning=tuning, norms=norms, reuse=reuse)
    return write_report(report, out)


def monitor_record(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The catastrophic-overfitting monitor's record of a finished run (gradreg.monitor.run_record)."""
    try:
        with open(run_dir / "log.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        rows = []
    return run_record(metrics, rows)


def row_norms(models: dict[str, torch.nn.Module], bundle: DataBundle, *, norm: str, n: int, iterations: int,
              seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per row, the per-example ‖∇ₓL‖₁, ‖∇ₓL‖₂ and ‖J(x)‖_{p,2} (p the experiment's threat norm)
    on the first ``n`` test points (:func:`gradreg.analysis.input_gradient_norms`)."""
    from .analysis import input_gradient_norms
    from .protocols import test_subset

    x, y = test_subset(bundle, n)
    return {name: input_gradient_norms(m, x, y, opnorm_p=norm, opnorm_q="l2", iterations=iterations, seed=seed)
            for name, m in models.items()}


def step_costs(exp: experiments.Experiment, chosen: list[experiments.Row], budget: dict[str, Any], out: Path,
               data_dir: str | None, *, rounds: int,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, StepCost]:
    """Every row's training step interleaved with the others' in this process, relative to the
    clean row's (:mod:`gradreg.cost`); one fixed training batch of the budget's size."""
    from .trainer import build_model, build_objective

    steps = {}
    bundle = None
    clean = next(r.name for r in chosen if r.method == "clean")
    for row in chosen:
        cfg = row_config(exp, row, budget, out, data_dir)
        if bundle is None:
            bundle = load_data(cfg.data, data_dir=cfg.data_dir)
        torch.manual_seed(0)
        model, _ = build_model(cfg, bundle)
        objective, _, _ = build_objective(cfg)
        objective.setup(model, bundle.train_x, bundle.bounds)  # as the training loop does
        x, y = bundle.train_x[:cfg.batch_size], bundle.train_y[:cfg.batch_size]
        steps[row.name] = training_step(model, objective, x, y, lr=cfg.lr)
    costs = interleaved_costs(steps, reference=clean, rounds=rounds, clock=clock)
    # every method's step does the clean step's work and more (the objective's clean pass, or
    # its attack's gradient plus a pass on the perturbed batch): never shown below 1×
    return {name: c if name == clean else floor_at_clean(c) for name, c in costs.items()}


def report_only(name: str, *, budget_name: str, out: Path, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Rebuild ``out``'s report, table and plots from its ``results.json`` without training or
    attacking: every row's per-example outcomes, step costs (with their rounds where kept), λ
    choices, transfer outcomes and norms come from the file; the masking checks are recomputed
    from the outcomes (so an older file's empty checks now read "not measured"). Results
    written before some fields existed still load: what they lack reads as not measured."""
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"--report-only needs a finished output folder: {path} does not exist "
                                f"(run `gradreg reproduce {name} --budget {budget_name} --out {out}` first)")
    stored = json.loads(path.read_text())
    if stored.get("experiment") != name or stored.get("budget") != budget_name:
        raise ValueError(f"{path} holds experiment {stored.get('experiment')!r}, budget {stored.get('budget')!r}, "
                         f"not {name!r}, {budget_name!r}")
    missing = [n for n, r in stored.get("rows", {}).items() if not r.get("evals")]
    if not stored.get("rows") or missing:
        raise ValueError(f"{path} has no per-example outcomes for rows {missing or 'any'}: it cannot be re-rendered")
    exp = experiments.load(name).for_budget(budget_name)
    budget = exp.budget(budget_name)
    settings = eval_settings(exp, budget)
    seeds = [int(v) for v in stored["seeds"]]
    results: dict[str, RowResult] = {}
    for row_name, r in stored["rows"].items():
        method = next((row.method for row in exp.rows if row.name == row_name), "")
        evals = [ModelEval.from_dict(d) for d in r["evals"]]
        transfer = {src: [torch.stack([unbits(b) for b in seed_rows]) for seed_rows in per_seed]
                    for src, per_seed in (r.get("transfer_outcomes") or {}).items()}
        for k, ev in enumerate(evals):
            curves = {src: flags[k].double().mean(dim=1).tolist() for src, flags in transfer.items()}
            ev.checks = masking_checks(ev, tolerance=settings.tolerance, transfer=curves or None)
        results[row_name] = RowResult(
            row_name, method, evals, [float(v) for v in r.get("train_seconds_per_seed", [r.get("train_seconds", math.nan)])],
            [float(v) for v in r.get("test_accuracy_per_seed", [ev.clean for ev in evals])], transfer=transfer,
            lrc=r.get("lrc_per_seed") or [],
            step_cost=StepCost.from_dict(r["step_cost"]) if r.get("step_cost") else None,
            monitor=r.get("monitor_per_seed") or [])
    tuning = {n: LamChoice(c["lam"], c["source"], c["detail"], tuple(c.get("grid") or ()), c.get("record"),
                           c.get("stop", ""), tuple(tuple(p) for p in c.get("curve") or ()))
              for n, c in (stored.get("lam") or {}).items()}
    lrc = None
    if stored.get("lrc"):
        d = stored["lrc"]
        lrc = LRCSettings(eps=float(d["eps"]), samples=int(d["samples"]), scale=str(d["scale"]),
                          marginal_std=float(d.get("marginal_std", 1.0)))
    # describe what the stored outcomes hold, not what the budget would run today
    all_evals = [ev for r in results.values() for ev in r.evals]
    lacking = []
    if curve_only(exp, budget) and not any(ev.raw_curves.get("pgd") for ev in all_evals):
        settings.attacks = tuple(a for a in settings.attacks if a != "pgd")
        settings.eps = None
        lacking.append("raw PGD ε curves")
    # the caption says what the stored runs did, not what the budget asks today
    settings.aa_after_pgd = any(a.get("run", {}).get("after_pgd") for ev in all_evals for a in ev.autoattack or [])
    audits = [a["square"] for ev in all_evals for a in ev.autoattack or [] if a.get("square")]
    settings.square_n = max((int(a["n"]) for a in audits), default=0)
    if not audits and budget.get("square_n"):
        lacking.append("a Square audit")
    stored["lacking"] = lacking
    log(f"re-rendering {path} ({len(results)} rows, seeds {seeds}) without training or attacking")
    report = ReportInput(exp, budget_name, budget, results, settings, seeds=seeds, elapsed_seconds=0.0,
                         matrix=stored.get("transfer") or {}, lrc=lrc, twins=stored.get("transfer_twin_seeds"),
                         provenance=stored.get("transfer_sources") or [], tuning=tuning,
                         stored_norms=stored.get("norms"), rendered_from=stored)
    return write_report(report, out)
