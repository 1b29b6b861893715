"""Run a declarative experiment: train every row, evaluate, build the paper's table with our
number beside the paper's in every cell that has one.

Columns: ``test`` (clean accuracy), attack columns averaged over the ε grid (``rand``, ``PGD``,
``T-PGD``, ``FGSM``), transfer columns ``←ROW``, ``ρ`` (DeepFool), and the LRC columns of the
SGR paper's long-range-correlated noise attack at the one strength ``[lrc] eps`` of the
experiment file, worst-of-``samples``:

- ``LRC ζ=Z``: ξ ~ N(0, Σ_LRC) with decay length Z pixels (:mod:`gradreg.attacks.lrc`), unit
  marginal variance times s, where ``[lrc] scale = "unit"`` gives s = 1 (SPEC §3) and
  ``"data"`` gives s = σ_data, the square root of the training inputs' mean per-pixel variance
  (Σ_LRC standardized to the data's marginal variance, as SGR standardizes its Σ; our reading).
  An absent ``scale`` is ``gradreg.attacks.lrc.DEFAULT_LRC_SCALE`` ("data"), the default of
  ``gradreg lrc`` too;
- ``LRC Σ=data``: ξ ~ N(0, Σ_data), the empirical covariance of the training inputs used as
  Σ_LRC (our reading of the paper's "data covariance as Σ_LRC"; same mean noise power ε²·σ²_data
  as the data-scaled ζ columns).

An experiment may also tune λ (rows with a ``lams`` grid: :func:`tune_rows`, one ``gradreg
sweep`` per row on a validation split of the training data), and its report then adds the
robustness-per-compute frontier (:mod:`gradreg.frontier`), the norms each trained model has
(:mod:`gradreg.analysis`, budget ``norms_n``) and the answer to its ``[reading]`` question
(:func:`honest_reading`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import experiments
from .config import TrainConfig, apply_overrides, parse_term
from .data import DataBundle
from .data import load as load_data
from . import stats
from .analysis import norm_stats, norms_markdown, plot_norm_distributions
from .cost import StepCost, floor_at_clean, interleaved_costs, relative_cost, training_step
from .frontier import FrontierPoint, plot_frontier
from .monitor import GAP, run_record
from .protocols import (
    EvalSettings,
    ModelEval,
    cached_evaluation,
    fingerprint,
    lrc_covariance_curve,
    lrc_curves,
    lrc_data_factor,
    lrc_data_std,
    masking_checks,
    masking_lines,
    bits,
    masking_summary,
    transfer_flags,
    unbits,
)
from .attacks.lrc import DEFAULT_LRC_SCALE, LRC_SCALES
from .report import (fmt, fmt_interval, interval_columns, markdown_table, plot_curves, plot_lambda_curves, plot_matrix,
                     write_csv, write_json)
from .runs import load_run
from .stats import Comparison, Interval, adjust_family, compare, from_count, mean_score, over_seeds
from .threat import parse_eps
from .runner import Runner, default_jobs, is_trained
from .sweep import (DEFAULT_VALIDATION_FRACTION, SweepPoint, SweepResult, SweepRow, SweepSpec, gather, is_finished,
                    sweep_points, write_records)
from .widen import LamScore, decide, hard_limits

# a column name → which attack's grid average it shows (transfer columns are "←ROW")
# T-PGD: the multi-target reading, the one that puts the SGR paper's T-PGD below its PGD (see
# gradreg.attacks.gradient)
# T-PGD rand: the seed spec's targeted PGD towards one random class ≠ label (gradreg.attacks.gradient
# "tpgd"), reported beside the all-targets reading
ATTACK_COLUMNS = {"rand": "uniform", "PGD": "pgd", "T-PGD": "tpgd-all", "T-PGD rand": "tpgd", "FGSM": "fgsm"}
DATA_LABELS = {"mnist10k": "MNIST-10k (8,000 train / 2,000 test from the MNIST test set)",
               "digits": "scikit-learn digits (8×8)", "mnist": "MNIST", "cifar10": "CIFAR-10",
               "fashion-mnist": "Fashion-MNIST", "cifar100": "CIFAR-100"}

LRC_DATA_COLUMN = "LRC Σ=data"
_LRC_ZETA_COLUMN = re.compile(r"^LRC ζ=([0-9.]+)$")

TRAIN_KEYS = {"data", "data_dir", "model", "epochs", "batch_size", "lr", "optimizer", "schedule", "momentum",
              "weight_decay", "augment", "seed", "model_params", "lr_milestones", "lr_gamma", "device",
              "augment_kind", "augment_pad", "standardize"}  # the SGR paper's preprocessing, per budget


@dataclass
class RowResult:
    """One row of the table over its seeds (lists are per seed, in the order of the seeds)."""

    name: str
    method: str
    evals: list[ModelEval]
    train_seconds: list[float]
    test_accuracy: list[float]
    transfer: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # source row → per seed (K, n) bool
    lrc: list[dict[str, float]] = field(default_factory=list)  # per seed: LRC column → accuracy at the ε
    step_cost: StepCost | None = None
    monitor: list[dict[str, Any] | None] = field(default_factory=list)  # per seed: gradreg.monitor.run_record

    @property
    def eval(self) -> ModelEval:
        return self.evals[0]


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
        scale = str(lrc.get("scale", DEFAULT_LRC_SCALE))
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


def run_name(row: experiments.Row, seed: int, *, default_seed: int | None) -> str:
    """Run folder of a row at a seed: the row's slug for the budget's own seed when no seeds are
    asked for (so earlier outputs are reused), ``slug-sSEED`` otherwise; a tuned row's folder
    also names its λ (``slug-lamΛ``), so a run trained at another λ is never reused."""
    value = row.tuned_value
    slug = row.slug if not row.lams or value is None else f"{row.slug}-lam{value:g}"
    return slug if seed == default_seed else f"{slug}-s{seed}"


@dataclass(frozen=True)
class LamChoice:
    """The λ a row trains with and where it comes from (printed in the report)."""

    lam: float | None
    source: str  # "sweep", "declared" (no grid) or "declared (sweep chose none)"
    detail: str
    grid: tuple[float, ...] = ()
    record: str | None = None  # the sweep's folder under the output folder (sweep.md, sweep.json, sweep.png)
    stop: str = ""  # why widening the grid stopped (gradreg.widen: interior, limit, plateau, …); "" without widening
    curve: tuple[tuple[float, float, float], ...] = ()  # (λ, clean, PGD) validation accuracies, seed means, by λ


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
    """A tuned row's training config on the validation split, scored by PGD at the training ε."""
    if exp.autoattack_eps is None:
        raise ValueError(f"experiment {exp.name!r}: tuning λ of {row.name!r} needs the training ε (autoattack_eps)")
    base = row_config(exp, row, budget, out / "sweeps", data_dir)
    apply_overrides(base, {"validation_fraction": float(budget.get("sweep_validation_fraction",
                                                                   DEFAULT_VALIDATION_FRACTION)),
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
        detail = (f"{decision.reason} (validation seeds {', '.join(map(str, seeds))}; gradreg.widen"
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
            "aa_n": budget.get("aa_n"), "aa_params": params}


def aa_columns(exp: experiments.Experiment) -> list[str]:
    """The columns at the training ε, if the experiment has them: PGD, AutoAttack and their
    per-point worst case (the robust column the report's verdicts use)."""
    if exp.autoattack_eps is None:
        return []
    return [f"PGD ε={exp.autoattack_eps:g}", f"AA ε={exp.autoattack_eps:g}", worst_column(exp)]


def worst_column(exp: experiments.Experiment) -> str:
    """The robust column: a point counts only if every attack run on it left it standing."""
    return f"worst ε={exp.autoattack_eps:g}"


def display_columns(exp: experiments.Experiment) -> list[tuple[str, int | None]]:
    """(column, index into the paper's numbers): the experiment's columns with the AutoAttack
    pair placed right after PGD (or after the accuracy columns if there is no PGD column)."""
    cols: list[tuple[str, int | None]] = [(c, j) for j, c in enumerate(exp.columns)]
    extra = [(c, None) for c in aa_columns(exp)]
    if not extra:
        return cols
    at = next((k + 1 for k, (c, _) in enumerate(cols) if c == "PGD"), len(cols))
    return cols[:at] + extra + cols[at:]


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


@dataclass
class Reuse:
    """How much of a ``reproduce`` invocation's work was already done by an earlier one (the
    report says so next to its time, which counts only this invocation)."""

    runs: dict[str, bool] = field(default_factory=dict)  # run folder → finished before this invocation
    evaluations: int = 0
    reused_evaluations: int = 0

    def training(self, run_dir: Path, *, done: bool) -> None:
        self.runs.setdefault(str(run_dir), done)  # a run met twice (the sweeps' shared clean reference) counts once

    @property
    def trainings(self) -> int:
        return len(self.runs)

    @property
    def reused_trainings(self) -> int:
        return sum(self.runs.values())

    def text(self) -> str:
        if not (self.reused_trainings or self.reused_evaluations):
            return ""
        return (f" It reused {self.reused_trainings} of {self.trainings} trainings (sweep points included) and "
                f"{self.reused_evaluations} of {self.evaluations} model evaluations finished by earlier invocations of "
                "the same command, whose time is not in it.")


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
                                            run_name=run_name(row, seed, default_seed=naming_default))
               for seed in seed_list for row in chosen}
    for source in [s for s in exp.transfer_sources if any(r.name == s for r in chosen)]:
        row = next(r for r in chosen if r.name == source)
        for twin in twin_seeds(seed_list):
            if (source, twin) not in planned:
                planned[(source, twin)] = row_config(exp, row, budget, out, data_dir, seed=twin,
                                                     run_name=run_name(row, twin, default_seed=naming_default))
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
                   log: Callable[[str], None] = _log, jobs: int | None = None, print_commands: bool = False,
                   launcher: Sequence[str] | None = None) -> dict[str, Any]:
    """Train (or reuse finished runs in ``out/runs``) every row once per seed, evaluate, and write
    ``out/report.md``. Transfer sources are twins trained with another seed. A budget's
    ``threads`` sets torch's intra-op threads for the whole run (1 for the tiny budgets' small
    models, whose operations are too small to split and slow down when the cores are shared).

    Independent trainings (a wave of sweep points, then every row × seed) run as ``jobs``
    one-thread worker processes (:mod:`gradreg.runner`; default: the budget's ``jobs``, else the
    number of cores, but 1 for a ``tiny`` budget, whose sub-second trainings cost less than a
    worker's start; 1 trains in this process). ``print_commands`` trains nothing: it prints the
    next wave's unfinished trainings as resumable shell commands (``launcher`` starts gradreg in
    them) and returns ``{"printed": [...]}``; re-running it after they finish prints the next."""
    budget = experiments.load(name).budget(budget_name)
    runner = Runner(jobs=int(jobs or budget.get("jobs") or (1 if budget_name == "tiny" else default_jobs())),
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
    results: dict[str, RowResult] = {}
    for i, row in enumerate(chosen, 1):
        res = RowResult(row.name, row.method, [], [], [])
        for seed in seed_list:
            loaded = trained[(row.name, seed)]
            log(f"[{i}/{len(chosen)}] evaluating {row.name}, seed {seed}")
            if aa is not None:
                settings.aa_cache = str(out / "autoattack" / f"s{seed}")
            row_settings = replace(settings, square_n=square_n if audited(row) else 0)
            ev, reused = cached_evaluation(loaded.model, bundle, row_settings, name=row.name, progress=False,
                                           cache=out / "evaluations" / f"s{seed}" / f"{row.slug}.json")
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
    summary = write_report(exp, budget_name, budget, results, matrix, out, settings,
                           elapsed=time.perf_counter() - started, lrc=lrc, seeds=seed_list, twins=twins,
                           provenance=provenance, tuning=tuning, norms=norms, reuse=reuse)
    return summary


def monitor_record(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The catastrophic-overfitting monitor's record of a finished run (gradreg.monitor.run_record)."""
    try:
        with open(run_dir / "log.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        rows = []
    return run_record(metrics, rows)


def monitor_cell(res: RowResult) -> str:
    """The table's overfitting cell: seeds the drop rule flagged, and seeds whose last check had
    FGSM far above PGD (the gap sign), out of the seeds the monitor watched; "–" if none was."""
    recs = [r for r in res.monitor if r]
    if not recs:
        return "–"
    flagged = sum(1 for r in recs if r["flags"])
    gap = sum(1 for r in recs if r["gap_flag"])
    return f"{flagged}/{len(recs)}" + (f", gap {gap}/{len(recs)}" if gap else "")


def monitor_lines(results: dict[str, RowResult], seeds: list[int]) -> list[str]:
    """The report's section on the catastrophic-overfitting monitor (what each training's
    monitor saw, per row over its seeds)."""
    rows = []
    for name, res in results.items():
        recs = [r for r in res.monitor if r]
        if not recs:
            continue
        def mean(key: str) -> str:
            vals = [r[key] for r in recs if r.get(key) is not None]
            return f"{100 * sum(vals) / len(vals):.1f}" if vals else "–"
        rows.append([name, monitor_cell(res), mean("best_pgd_accuracy"), mean("last_fgsm_accuracy"),
                     mean("last_pgd_accuracy"), ", ".join(sorted({r["outcome"] for r in recs}))])
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


def cell_scores(res: RowResult, column: str) -> list[torch.Tensor] | None:
    """Per seed, each test point's score in [0, 1] behind the cell (the paired unit of the
    row comparisons): 0/1 outcomes, or a point's accuracy averaged over the ε grid; None for
    cells without per-point outcomes (LRC, ρ)."""
    if column == "test":
        clean = [ev.clean_flags for ev in res.evals]
        return [f.double() for f in clean if f is not None] if all(f is not None for f in clean) else None
    if column in ATTACK_COLUMNS:
        attack = ATTACK_COLUMNS[column]
        return [ev.scores(attack) for ev in res.evals] if all(attack in ev.flags for ev in res.evals) else None
    if column.startswith("←"):
        flags = res.transfer.get(column[1:])
        return [f.double().mean(dim=0) for f in flags] if flags else None
    kind, _, eps = column.partition(" ε=")
    if kind in ("PGD", "AA", "worst") and eps:
        out = []
        for ev in res.evals:
            entry = next((a for a in ev.autoattack or [] if f"{a['eps']:g}" == eps), None)
            if entry is None:
                return None
            aa = next(f for e, f in ev.aa_flags.items() if math.isclose(e, float(entry["eps"]), rel_tol=1e-5))
            pgd = unbits(entry["pgd_bits"])
            if kind == "AA":
                out.append(aa.double())
            elif kind == "PGD":
                out.append(pgd.double())
            else:  # per point, every attack run on it: PGD (its restarts), AutoAttack, Square where audited
                worst = pgd & aa
                if entry.get("square"):
                    square = unbits(entry["square"]["bits"])
                    worst[:square.numel()] &= square
                out.append(worst.double())
        return out
    return None


def cell_values(res: RowResult, column: str) -> list[float | None]:
    """The cell's number for every seed."""
    scores = cell_scores(res, column)
    if scores is not None:
        return [float(s.mean()) for s in scores]
    if column == "ρ":
        return [ev.rho for ev in res.evals]
    if lrc_column(column) is not None:
        return [cells.get(column) for cells in res.lrc] or [None]
    if column.startswith("←") or column in ATTACK_COLUMNS or column.startswith(("PGD ε=", "AA ε=", "worst ε=")):
        return [None]
    raise ValueError(f"unknown column {column!r}")


def cell(res: RowResult, column: str) -> float | None:
    """The cell's number: the mean over seeds."""
    raw = cell_values(res, column)
    values = [v for v in raw if v is not None]
    if not values or len(values) < len(raw):  # an empty cell in any seed
        return None
    return sum(values) / len(values)


def cell_interval(res: RowResult, column: str) -> Interval | None:
    """The cell's 95 % interval: Wilson (grid averages: :func:`gradreg.stats.mean_score`) for
    one seed, :func:`gradreg.stats.over_seeds` for several; None for ρ and empty cells."""
    if column == "ρ":
        return None
    raw = cell_values(res, column)
    values = [v for v in raw if v is not None]
    if not values or len(values) < len(raw):  # an empty cell in any seed
        return None
    scores = cell_scores(res, column)
    n = int(scores[0].numel()) if scores is not None else res.eval.n
    if not n:
        return None
    if len(values) > 1:
        return over_seeds([float(v) for v in values], n)
    if scores is not None:
        return mean_score(scores[0])
    return from_count(round(float(values[0]) * n), n)  # LRC: a proportion at n


COMPARED_COLUMNS = ("test", "PGD")  # (our choice) the clean and the main white-box column, plus AutoAttack


def difference_lines(column: str, scores: dict[str, torch.Tensor], *, reference: str | None) -> list[str]:
    """What the report may say about the rows of one column: every row against ``reference``
    (the clean row) and every row against the next one in the column's ranking, each sentence
    from a paired test on the same test points (:func:`gradreg.stats.compare`), the column's
    tests one family under Holm's correction (raw and adjusted p printed). ``scores[row]`` is
    ``(n,)`` (one seed) or ``(S, n)``."""
    return [f"{column}: " + c.wording() for c in column_tests(scores, reference=reference)]


def column_tests(scores: dict[str, torch.Tensor], *, reference: str | None) -> list[Comparison]:
    """The paired tests of :func:`difference_lines`, Holm-adjusted as one family."""
    names = list(scores)
    pairs = [(n, reference) for n in names if reference is not None and n != reference and reference in scores]
    ranked = sorted(names, key=lambda n: -float(scores[n].double().mean()))
    pairs += [(a, b) for a, b in zip(ranked, ranked[1:]) if (a, b) not in pairs and (b, a) not in pairs]
    return adjust_family([compare(scores[a], scores[b], a=a, b=b) for a, b in pairs])


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
            + " (gradreg.reproduce.resolved_objective).", ""]
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
        lines += monitor_lines(shown, seeds)
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
    audits = [a["square"] for ev in all_evals for a in ev.autoattack or [] if a.get("square")]
    settings.square_n = max((int(a["n"]) for a in audits), default=0)
    if not audits and budget.get("square_n"):
        lacking.append("a Square audit")
    stored["lacking"] = lacking
    log(f"re-rendering {path} ({len(results)} rows, seeds {seeds}) without training or attacking")
    return write_report(exp, budget_name, budget, results, stored.get("transfer") or {}, out, settings, elapsed=0.0,
                        lrc=lrc, seeds=seeds, twins=stored.get("transfer_twin_seeds"),
                        provenance=stored.get("transfer_sources") or [], tuning=tuning,
                        stored_norms=stored.get("norms"), rendered_from=stored)
