"""What an evaluation is asked to run and what it found: :class:`EvalSettings` (the protocol's
knobs, defaults the SGR paper's), :class:`ModelEval` (accuracies with the per-example outcomes
behind them, to and from JSON), :class:`Check` (one gradient-masking check) and the test subset."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .. import attacks, stats
from ..attacks.base import Attack
from ..data import DataBundle
from ..data.radii import default_grid, standard_eps
from ..stats import Interval
from ..threat import check_eps_fits

AA_VERSIONS = ("standard", "rand", "plus", "custom")


@dataclass
class EvalSettings:
    """What ``gradreg eval`` runs. Defaults are the SGR paper's protocol where it has one."""

    norm: str = "linf"
    eps: list[float] | None = None  # None: default_grid(data)
    attacks: tuple[str, ...] = ("fgsm", "pgd", "tpgd", "uniform")
    pgd_steps: int = 40
    pgd_restarts: int = 1  # random starts of the untargeted PGD (a point is broken if any breaks it)
    labels: str = "predicted"  # SGR paper: attack the predicted label
    deepfool: bool = True
    # AutoAttack at the radii aa_eps (None: standard_eps of the data set) on the first aa_n of
    # the evaluated points; aa_params go to the attack (e.g. version="custom", attacks=[...]);
    # aa_cache: a folder where finished batches are kept, so an interrupted run resumes
    autoattack: bool = False
    aa_eps: list[float] | None = None
    aa_version: str = "standard"
    aa_n: int | None = None
    aa_params: dict[str, Any] = field(default_factory=dict)
    aa_cache: str | None = None
    # AutoAttack only on the points PGD (at the same ε, with its restarts) left standing, as
    # AutoAttack chains its own attacks; its column is then the worst case of PGD and AutoAttack,
    # and Square audits only the points both left standing (our choice for CPU budgets; it saves
    # AutoAttack's time on the points PGD already broke and changes no worst-case outcome)
    aa_after_pgd: bool = False
    n_test: int | None = None  # evaluate the first n test points only
    batch_size: int = 256
    seed: int = 0
    unbounded_check: bool = True
    tolerance: float = 0.02  # slack of the masking checks, as a fraction of inputs (our choice)
    # PGD attacks every input afresh at every ε (no carry-over) and keeps that raw per-ε curve
    # for the masking check; the reported (cumulative) curve is derived from the same run, so
    # nothing is attacked twice. Cost: every input at every ε > 0 instead of only the inputs
    # still robust (1.5× the PGD time for the digits C&W test model, PGD-40; up to (K−1)× for a
    # model that falls at the first ε). False: the cheaper carry-over run, no raw curve (for PGD
    # the fast bisection sweep of gradreg.attacks.curves, which cannot show a rising curve).
    raw_pgd: bool = True
    # the gradient-free masking audit (square_check): Square with square_queries queries on the
    # first square_n AutoAttack points at every AutoAttack ε (0: not run)
    square_n: int = 0
    square_queries: int = 1000

    def grid(self, data_name: str) -> list[float]:
        return list(self.eps) if self.eps is not None else default_grid(data_name)

    def checked_grid(self, bundle: DataBundle) -> list[float]:
        """The grid, each ε checked against the data's bounds."""
        grid = self.grid(bundle.name)
        for e in grid:
            check_eps_fits(e, self.norm, bundle.bounds, bundle.train_x[0].numel())
        return grid

    def make_attack(self, name: str) -> Attack:
        params: dict[str, Any] = {"labels": self.labels}
        if name in ("pgd", "tpgd", "tpgd-all"):
            params.update(steps=self.pgd_steps, seed=self.seed)
        if name == "pgd" and self.pgd_restarts > 1:
            params["restarts"] = self.pgd_restarts
        elif name in ("uniform", "gaussian", "lrc"):
            params.update(seed=self.seed)
        if name == "fgsm" and self.norm == "l2":
            name = "fgm"
        return attacks.make(name, **params)

    def aa_grid(self, data_name: str) -> list[float]:
        return list(self.aa_eps) if self.aa_eps else [standard_eps(data_name, self.norm)]

    def make_autoattack(self) -> Attack:
        if self.aa_version not in AA_VERSIONS:
            raise ValueError(f"AutoAttack version must be one of {AA_VERSIONS}, got {self.aa_version!r}")
        return attacks.make("autoattack", version=self.aa_version, seed=self.seed, labels="true", **self.aa_params)


@dataclass
class Check:
    """One gradient-masking check; ``passed`` False is shown as a warning, None means the check
    had no data ("not measured", never "ok")."""

    name: str
    passed: bool | None
    detail: str

    @property
    def status(self) -> str:
        return "not measured" if self.passed is None else "ok" if self.passed else "**FAILED**"

    @property
    def failed(self) -> bool:
        return self.passed is False


@dataclass
class ModelEval:
    """Accuracies of one model, with the per-example outcomes behind them (for intervals and
    paired tests: point i of every flag tensor is the same test point)."""

    name: str
    eps: list[float]
    clean: float
    curves: dict[str, list[float]]  # attack → accuracy per ε (cumulative over radii: monotone)
    rho: float | None = None
    # one entry per AutoAttack ε: {"eps", "accuracy", "pgd", "n", "interval", "pgd_interval", "run"}
    autoattack: list[dict[str, Any]] | None = None
    unbounded: float | None = None  # PGD accuracy with ε covering the whole input box
    checks: list[Check] = field(default_factory=list)
    # attack → accuracy per ε with every ε attacked independently (no carry-over, not made
    # monotone): the honest curve for "accuracy falls with ε"; PGD only (EvalSettings.raw_pgd)
    raw_curves: dict[str, list[float]] = field(default_factory=dict)
    clean_flags: torch.Tensor | None = None  # (n,) bool: point i classified correctly
    flags: dict[str, torch.Tensor] = field(default_factory=dict)  # attack → (K, n) bool, as curves
    aa_flags: dict[float, torch.Tensor] = field(default_factory=dict)  # AutoAttack ε → (n_aa,) bool

    @property
    def n(self) -> int:
        return int(self.clean_flags.numel()) if self.clean_flags is not None else 0

    def average(self, attack: str) -> float:
        """Accuracy averaged over the ε grid (the SGR paper's metric)."""
        values = self.curves[attack]
        return sum(values) / len(values)

    def scores(self, attack: str) -> torch.Tensor:
        """Each point's accuracy averaged over the ε grid ``(n,)`` (the paired unit of the average)."""
        return self.flags[attack].double().mean(dim=0)

    def clean_interval(self) -> Interval | None:
        return stats.proportion(self.clean_flags) if self.clean_flags is not None and self.n else None

    def curve_intervals(self, attack: str) -> list[Interval] | None:
        """Wilson interval of the accuracy at every ε."""
        if attack not in self.flags or not self.n:
            return None
        return [stats.proportion(row) for row in self.flags[attack]]

    def average_interval(self, attack: str) -> Interval | None:
        """Interval of the grid average (:func:`gradreg.stats.mean_score`)."""
        return stats.mean_score(self.scores(attack)) if attack in self.flags and self.n else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every accuracy with n and its 95 % interval; per-example outcomes as
        0/1 strings (point i is character i)."""
        out: dict[str, Any] = {"name": self.name, "eps": self.eps, "n": self.n, "clean": self.clean,
                               "curves": self.curves, "raw_curves": self.raw_curves, "rho": self.rho,
                               "unbounded": self.unbounded, "autoattack": self.autoattack,
                               "checks": [vars(c) for c in self.checks],
                               "average": {a: self.average(a) for a in self.curves}}
        ci = self.clean_interval()
        out["intervals"] = {
            "clean": ci.as_dict() if ci else None,
            "curves": {a: [iv.as_dict() for iv in ivs] for a in self.curves if (ivs := self.curve_intervals(a))},
            "average": {a: iv.as_dict() for a in self.curves if (iv := self.average_interval(a))},
        }
        out["outcomes"] = {
            "clean": bits(self.clean_flags) if self.clean_flags is not None else None,
            "curves": {a: [bits(row) for row in f] for a, f in self.flags.items()},
            "autoattack": {f"{e:.6g}": bits(f) for e, f in self.aa_flags.items()},
        }
        return out


    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelEval:
        """The inverse of :meth:`to_dict` (intervals are recomputed from the outcomes)."""
        outcomes = d.get("outcomes") or {}
        clean_bits = outcomes.get("clean")
        return cls(name=d["name"], eps=[float(e) for e in d["eps"]], clean=float(d["clean"]),
                   curves={a: [float(v) for v in c] for a, c in d["curves"].items()},
                   raw_curves={a: [float(v) for v in c] for a, c in (d.get("raw_curves") or {}).items()},
                   rho=d.get("rho"), autoattack=d.get("autoattack"), unbounded=d.get("unbounded"),
                   checks=[Check(**c) for c in d.get("checks", [])],
                   clean_flags=unbits(clean_bits) if clean_bits is not None else None,
                   flags={a: torch.stack([unbits(r) for r in rows]) if rows else torch.zeros(0, 0, dtype=torch.bool)
                          for a, rows in (outcomes.get("curves") or {}).items()},
                   aa_flags={float(e): unbits(b) for e, b in (outcomes.get("autoattack") or {}).items()})


def bits(flags: torch.Tensor) -> str:
    """``(n,)`` bool → ``"0110…"`` (compact per-example outcomes in JSON)."""
    return "".join("1" if v else "0" for v in flags.tolist())


def unbits(text: str) -> torch.Tensor:
    """``"0110…"`` → ``(n,)`` bool (the inverse of :func:`bits`)."""
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def test_subset(bundle: DataBundle, n_test: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_test`` test points (the split is already shuffled and stratified)."""
    n = len(bundle.test_y) if n_test is None else min(n_test, len(bundle.test_y))
    return bundle.test_x[:n], bundle.test_y[:n]

