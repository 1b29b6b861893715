"""An experiment's results as the report reads them: the result model of a row over its seeds
(:class:`RowResult`), the λ each row used (:class:`LamChoice`), what an invocation reused
(:class:`Reuse`), the LRC protocol's settings, and the table's columns and cells — their names,
per-seed values, intervals and the paired tests between rows. No training and no attack runs
here: :mod:`gradreg.reproduce` fills these, :mod:`gradreg.experiment_report` writes them out.

In every cell our number stands beside the paper's where the paper has one. Columns: ``test``
(clean accuracy), attack columns averaged over the ε grid (``rand``, ``PGD``, ``T-PGD``, ``FGSM``), transfer columns ``←ROW``, ``ρ`` (DeepFool), and the LRC columns of the
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
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import experiments
from .data import DataBundle
from .cost import StepCost
from .protocols import (
    ModelEval,
    lrc_data_factor,
    lrc_data_std,
    unbits,
)
from .attacks.lrc import DEFAULT_LRC_SCALE, LRC_SCALES
from .stats import Comparison, Interval, adjust_family, compare, from_count, mean_score, over_seeds


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
