"""Declarative experiments (TOML files in this folder) that ``gradreg reproduce`` runs.

Each file names the paper's table, its rows (a method with λ and parameters each), its
columns, the budgets (``tiny`` on digits in minutes, ``cpu`` for a 2-core machine in about an
hour, ``paper`` for the papers' data and budgets on a GPU) and the paper's reference numbers.

- ``rows_from`` + ``row_names`` reuse another experiment's rows (so shared settings cannot
  drift apart); ``[[rows]]`` in the same file add rows of its own after them.
- a row's ``note`` says which variant of a method it runs and where it departs from the paper
  it cites (e.g. Madry's PGD-AT vs the SGR paper's clean/adversarial mixture on predicted
  labels); the report prints it under the table.
- ``[paper]`` lists one number per column, in column order; ``nan`` marks a cell the paper
  does not report (TOML has no null), and trailing cells may be left out.
- ``[lrc]`` configures the LRC columns (``"LRC ζ=4"``, ``"LRC Σ=data"``): ``eps`` (noise
  strength), ``samples`` (worst-of-k; a budget may override it with ``lrc_samples``) and
  ``scale`` (``"unit"`` or ``"data"``, see :mod:`gradreg.reproduce`).
- ``autoattack_eps`` (the training ε) adds the columns "PGD ε=E" and "AA ε=E" beside PGD; a
  budget sets the AutoAttack protocol with ``aa_version``, ``aa_n`` (first N points) and, for a
  cheap custom run, ``aa_attacks``, ``aa_n_iter``, ``aa_n_queries``.
- a budget's ``cost_rounds`` (> 0) measures the step-cost column: the rows' training steps
  interleaved in one process for that many rounds (:mod:`gradreg.cost`).
- a budget's ``eps`` is the training ε of that budget: every row's penalty value written
  ``"$eps"`` and an ``autoattack_eps = "$eps"`` take it (:meth:`Experiment.for_budget`), so one
  file serves data sets with different radii (MNIST 0.3, CIFAR-10 8/255).
- a row's ``lams`` is its λ grid: ``gradreg reproduce`` tunes λ on a validation split carved
  from the training data (:mod:`gradreg.sweep`, its selection rule) before training the row; a
  budget's ``sweep_points = N`` keeps N evenly spaced points of every grid (1: the middle one);
  ``sweep_pgd_steps``, ``sweep_validation_fraction``, ``sweep_rule`` and
  ``sweep_tolerance_points`` set the sweep's validation PGD and its selection rule.
  ``sweep_epochs`` trains the sweep points for fewer epochs than the table's rows (brief sweeps,
  a cut the budget states).
- ``widen = true`` lets a sweep whose choice sits at an end of its grid add λ beyond that end, at
  most ``max_widen`` (3) rounds, until the choice is interior or a hard limit stops it
  (:mod:`gradreg.widen`; a row's ``lam_max`` states a limit of its own);
  a row's ``lam_from = "NAME"`` trains at the λ tuned for row NAME instead of a sweep of its own;
  a row's ``sweep_rule`` replaces the budget's rule for that row (its note says why);
  ``sweep_margin_points`` (1 with widening, else 0) is the validation PGD accuracy difference a
  larger λ must exceed to be preferred, ``sweep_seeds`` the training seeds each λ is validated
  with (their mean is compared).
- ``eps_grid``: the ε of the attack columns' curves (a column is their mean), e.g. the hard
  radius's 0.1, 0.2, 0.3; default: the data set's grid.
- ``jobs``: the default of ``reproduce --jobs`` for the budget (else the number of cores; 1 for
  a budget named ``tiny``).
- other budget keys: ``seeds`` (the seeds when ``--seeds`` is not given), ``threads`` (torch's
  intra-op threads for the run), ``pgd_restarts`` (random starts of the evaluation's PGD),
  ``norms_n`` / ``norms_iterations`` (the per-example gradient and operator norms of every
  trained row on that many test points, with that many power iterations).
- ``[reading]`` states the report's honest-reading question (see :mod:`gradreg.reproduce`).
- ``[tune]`` says how tuned rows are scored on the validation split: ``attack = "pgd"`` (PGD at
  ``autoattack_eps``, the default) or ``"lrc"`` (worst-of-k LRC noise of the ``[lrc]`` strength,
  scale and samples, at decay length ``lrc_zeta``; the SGR paper tunes λ at ζ = 8); its ``lams``
  (``{ "ROW" = [...] }``) gives λ grids to rows by name, rows reused with ``rows_from`` included.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from ..threat import parse_eps

BUDGETS = ("tiny", "cpu", "paper", "paper-cifar10")
EPS = "$eps"  # a penalty value (or autoattack_eps) that takes the budget's ``eps``


@dataclass
class Row:
    name: str
    method: str
    lam: float | None = None
    task_weight: float | None = None
    penalty: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # extra TrainConfig fields for this row
    note: str = ""  # which variant the row runs, where it departs from the cited paper (printed in the report)
    lams: list[float] = field(default_factory=list)  # the λ grid tuned on a validation split (empty: λ as declared)
    lam_max: float | None = None  # a stated largest λ that widening the grid may reach (gradreg.widen)
    lam_key: str = "lam"  # what ``lams`` sets: the objective's λ, or a "penalty.KEY" (a term's own weight)
    lam_from: str = ""  # another row's name: train at the λ tuned for it, without a sweep of its own (a stated cut)
    sweep_rule: str = ""  # this row's selection rule (within-clean or best-pgd); empty: the budget's ``sweep_rule``

    @property
    def tuned_value(self) -> float | None:
        """The declared value of what ``lams`` sets (``lam``, or the penalty's ``lam_key``)."""
        if self.lam_key == "lam":
            return self.lam
        value = self.penalty.get(self.lam_key.partition(".")[2])
        return None if value is None else float(value)

    def at(self, value: float | None) -> Row:
        """This row with what ``lams`` sets at ``value``."""
        if self.lam_key == "lam":
            return replace(self, lam=value)
        return replace(self, penalty={**self.penalty, self.lam_key.partition(".")[2]: value})

    @property
    def slug(self) -> str:
        return "".join(ch if ch.isalnum() else "-" for ch in self.name.lower()).strip("-")


@dataclass
class Experiment:
    name: str
    title: str
    note: str
    columns: list[str]
    transfer_sources: list[str]
    norm: str
    budgets: dict[str, dict[str, Any]]
    rows: list[Row]
    paper: dict[str, list[float | None]]
    paper_data: str
    lrc: dict[str, Any] = field(default_factory=dict)  # the LRC columns' eps, samples, scale
    autoattack_eps: float | None = None  # the training ε: PGD and AutoAttack columns there
    autoattack_at_budget_eps: bool = False  # autoattack_eps = "$eps": the budget's eps (set by for_budget)
    reading: dict[str, Any] = field(default_factory=dict)
    # [tune]: how tuned rows are scored on validation: attack = "pgd" (at autoattack_eps, the
    # default) or "lrc" (LRC noise of the [lrc] strength at decay length lrc_zeta); ``lams`` gives
    # grids to rows by name, also to rows reused with rows_from
    tune: dict[str, Any] = field(default_factory=dict)  # the honest-reading question ([reading])

    def budget(self, name: str) -> dict[str, Any]:
        if name not in self.budgets:
            raise ValueError(f"experiment {self.name!r} has no budget {name!r} (has: {', '.join(self.budgets)})")
        return dict(self.budgets[name])

    def for_budget(self, name: str) -> Experiment:
        """This experiment with every ``"$eps"`` replaced by the budget's ``eps`` (8/255 style
        allowed); an error if a row needs it and the budget has none."""
        budget = self.budget(name)
        eps = parse_eps(budget["eps"]) if "eps" in budget else None

        def value(v: Any, where: str) -> Any:
            if v != EPS:
                return v
            if eps is None:
                raise ValueError(f"experiment {self.name!r}: {where} is {EPS!r} but budget {name!r} sets no eps")
            return eps

        rows = [replace(r, penalty={k: value(v, f"row {r.name!r} penalty.{k}") for k, v in r.penalty.items()})
                for r in self.rows]
        aa = value(EPS, "autoattack_eps") if self.autoattack_at_budget_eps else self.autoattack_eps
        return replace(self, rows=rows, autoattack_eps=aa, autoattack_at_budget_eps=False)


def names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))


def load(name: str) -> Experiment:
    """Read the experiment ``name`` shipped with gradreg."""
    if name not in names():
        raise ValueError(f"unknown experiment {name!r} (known: {', '.join(names())})")
    raw = tomllib.loads(resources.files(__name__).joinpath(f"{name}.toml").read_text())
    rows = []
    if "rows_from" in raw:  # reuse another experiment's rows, so shared settings cannot drift apart
        base = {r.name: r for r in load(raw["rows_from"]).rows}
        rows = [base[n] for n in raw["row_names"]]
    rows += [Row(**r) for r in raw.get("rows", [])]  # the file's own rows, after the reused ones
    if len({r.name for r in rows}) != len(rows):
        raise ValueError(f"experiment {name!r}: row names must be unique, got {[r.name for r in rows]}")
    tune = dict(raw.get("tune", {}))
    if tune.get("attack", "pgd") not in ("pgd", "lrc"):
        raise ValueError(f"experiment {name!r}: [tune] attack must be pgd or lrc, got {tune['attack']!r}")
    grids = {str(k): [float(v) for v in vs] for k, vs in tune.get("lams", {}).items()}
    unknown = sorted(set(grids) - {r.name for r in rows})
    if unknown:
        raise ValueError(f"experiment {name!r}: [tune] lams names rows it does not have: {unknown}")
    rows = [replace(r, lams=grids[r.name]) if r.name in grids else r for r in rows]
    from ..sweep import RULES  # here, not at the top: the sweep module is not needed to list experiments

    by_name = {r.name: r for r in rows}
    for r in rows:
        if r.sweep_rule and r.sweep_rule not in RULES:
            raise ValueError(f"experiment {name!r}: row {r.name!r} has sweep_rule {r.sweep_rule!r} "
                             f"(known: {', '.join(RULES)})")
        if r.lam_from and (r.lams or r.lam_from not in by_name or not by_name[r.lam_from].lams):
            raise ValueError(f"experiment {name!r}: row {r.name!r} takes lam_from {r.lam_from!r}, which must be "
                             "another row with a λ grid (and the row itself has none)")
    missing = [s for s in raw.get("transfer_sources", []) if s not in {r.name for r in rows}]
    if missing:
        raise ValueError(f"experiment {name!r}: transfer sources {missing} are not rows")
    aa = raw.get("autoattack_eps")
    paper = {row: [None if isinstance(v, float) and math.isnan(v) else v for v in numbers]  # nan: not reported
             + [None] * (len(raw["columns"]) - len(numbers))  # a paper may report fewer columns
             for row, numbers in raw.get("paper", {}).items()}
    return Experiment(name=name, title=raw["title"], note=raw.get("note", ""), columns=raw["columns"],
                      transfer_sources=raw.get("transfer_sources", []), norm=raw.get("norm", "linf"),
                      budgets=raw["budgets"], rows=rows, paper=paper,
                      paper_data=raw.get("paper_data", ""), lrc=dict(raw.get("lrc", {})),
                      autoattack_eps=float(aa) if aa is not None and aa != EPS else None,
                      autoattack_at_budget_eps=aa == EPS, reading=dict(raw.get("reading", {})), tune=tune)
