"""AutoAttack through the official ``autoattack`` package when it is importable, else through
``pyautoattack`` (optional extra: ``pip install gradreg[autoattack]``).

Croce, Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (arXiv 2003.01690): APGD-CE, APGD-T, FAB-T and Square in
the ``standard`` version; ``version="custom"`` with ``attacks=[...]`` runs a subset.

AutoAttack assumes inputs in [0, 1]. For other bounds [lo, hi] we run it on the affine image
u = (x − lo)/(hi − lo) ∈ [0, 1] of the input, with the model composed with the inverse map and
ε/(hi − lo) as radius (ℓp norms scale linearly), then map the result back. For [0, 1] the map
is the identity.

The package's attack object is built once per (model, ε, bounds) and reused for every batch
(:attr:`AutoAttack.built` counts the builds); :meth:`AutoAttack.describe` records which package
ran, its version, the attacks and the seed.

Example::

    attack = make("autoattack", version="custom", attacks=["apgd-ce"], n_iter=20)
    x_adv = attack(model, x, y, ThreatModel("linf", 8 / 255, (0.0, 1.0)))
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..modes import BNPolicy
from ..threat import ThreatModel
from . import ATTACKS
from .base import Attack, Labels

INSTALL_HINT = "AutoAttack needs the optional package pyautoattack: pip install gradreg[autoattack]"
_AA_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
BACKENDS = ("autoattack", "pyautoattack")  # the official package first


def backend() -> str | None:
    """The AutoAttack package that will run: ``"autoattack"`` (official) if importable, else
    ``"pyautoattack"``, else None."""
    for name in BACKENDS:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):  # a module set to None in sys.modules (tests) is absent
            continue
    return None


def backend_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return getattr(importlib.import_module(name), "__version__", "unknown")


def _build(name: str, model: nn.Module, *, attacks: list[str] | None, device: torch.device, eps: float, norm: str,
           seed: int, version: str) -> Any:  # the package's untyped AutoAttack object
    """The package's AutoAttack object; the two packages name their arguments differently."""
    if name == "autoattack":
        from autoattack import AutoAttack as Official  # optional package

        aa = Official(model, norm=norm, eps=eps, version=version, device=device, seed=seed, verbose=False)
        if attacks:
            aa.attacks_to_run = list(attacks)
        return aa
    from pyautoattack import AutoAttack as _AA

    return _AA(model, attacks=attacks, device=device, eps=eps, norm=norm, seed=seed, version=version)  # norm/version are checked strings


class _UnitBox(nn.Module):
    """model ∘ (u ↦ lo + (hi − lo)·u): the model seen from the unit box."""

    def __init__(self, model: nn.Module, lo: float, scale: float) -> None:
        super().__init__()
        self.model, self.lo, self.scale = model, lo, scale

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.lo == 0.0 and self.scale == 1.0:
            return self.model(u)
        return self.model(self.lo + self.scale * u)


class AutoAttack(Attack):
    """AutoAttack (Croce & Hein 2020) via ``pyautoattack``; any bounds, ℓ∞/ℓ2/ℓ1."""

    def __init__(self, *, version: Literal["standard", "plus", "rand", "custom"] = "standard",
                 attacks: Sequence[str] | None = None, n_iter: int | None = None, n_restarts: int | None = None,
                 n_queries: int | None = None, labels: Labels = "true", bn_policy: BNPolicy = "eval", seed: int = 0,
                 verbose: bool = False) -> None:
        super().__init__(name="autoattack", norms=tuple(_AA_NORMS), labels=labels, bn_policy=bn_policy, seed=seed)
        self.backend = backend()
        if self.backend is None:  # fail at construction, not mid-evaluation
            raise ImportError(INSTALL_HINT)
        if version == "custom" and not attacks:
            raise ValueError("autoattack version='custom' needs attacks=[...], e.g. ['apgd-ce']")
        if version != "custom" and attacks:
            raise ValueError("autoattack: attacks=[...] needs version='custom'")
        self.version = version
        self.attacks = list(attacks) if attacks else None
        self.n_iter = int(n_iter) if n_iter is not None else None
        self.n_restarts = int(n_restarts) if n_restarts is not None else None
        self.n_queries = int(n_queries) if n_queries is not None else None  # Square's query budget
        self.verbose = bool(verbose)
        self.deterministic = False
        self.built = 0  # how many package objects were built (one per model, ε and bounds)
        self._cached: tuple[tuple[object, ...], object] | None = None

    def describe(self) -> dict[str, object]:
        """What ran: package, version, attacks, AutoAttack version, seed and budgets."""
        attacks = self.attacks or {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
                                   "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
                                   "rand": ["apgd-ce", "apgd-dlr"]}.get(self.version, [])
        assert self.backend is not None
        return {"package": self.backend, "package_version": backend_version(self.backend), "version": self.version,
                "attacks": list(attacks), "seed": self.seed, "n_iter": self.n_iter, "n_restarts": self.n_restarts,
                "n_queries": self.n_queries}

    def _package_attack(self, model: nn.Module, threat: ThreatModel, device: torch.device) -> Any:
        """The package's attack object for this model, ε and bounds, built on first use only."""
        key = (id(model), threat.norm, threat.eps, threat.lo, threat.hi, str(device))
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        scale = threat.hi - threat.lo
        assert self.backend is not None
        aa = _build(self.backend, _UnitBox(model, threat.lo, scale), attacks=self.attacks, device=device,
                    eps=threat.eps / scale, norm=_AA_NORMS[threat.norm], seed=self.seed, version=self.version)
        # None keeps the package's settings for the version (e.g. 100 iterations, 1 restart in "standard")
        for sub in (aa.apgd, aa.apgd_targeted, aa.fab, aa.square):
            if self.n_iter is not None and sub is not aa.square:
                sub.n_iter = self.n_iter
            if self.n_restarts is not None:
                sub.n_restarts = self.n_restarts
        if self.n_queries is not None:
            aa.square.n_queries = self.n_queries
        self._cached = (key, aa)
        self.built += 1
        return aa

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        if threat.eps == 0 or x.shape[0] == 0:
            return x.clone()  # the ε = 0 ball is {x}; APGD's step sizes would divide by ε
        scale = threat.hi - threat.lo
        u = x if (threat.lo == 0.0 and scale == 1.0) else (x - threat.lo) / scale
        aa = self._package_attack(model, threat, x.device)
        logger = logging.getLogger("auto-attack")
        level = logger.level
        if not self.verbose:
            logger.setLevel(logging.WARNING)
        try:
            u_adv = aa.run_standard_evaluation(u, y, bs=x.shape[0]) if self.backend == "autoattack" \
                else aa.run_standard_evaluation(u, y, batch_size=x.shape[0])[0]
        finally:
            logger.setLevel(level)
        return u_adv if (threat.lo == 0.0 and scale == 1.0) else threat.lo + scale * u_adv


@ATTACKS.register("autoattack")
def autoattack(*, version: Literal["standard", "plus", "rand", "custom"] = "standard",
               attacks: Sequence[str] | None = None, n_iter: int | None = None, n_restarts: int | None = None,
               n_queries: int | None = None, labels: Labels = "true", bn_policy: BNPolicy = "eval", seed: int = 0,
               verbose: bool = False) -> AutoAttack:
    """AutoAttack (Croce & Hein 2020) via the official autoattack package or pyautoattack
    (pip install gradreg[autoattack])."""
    return AutoAttack(version=version, attacks=attacks, n_iter=n_iter, n_restarts=n_restarts, n_queries=n_queries,
                      labels=labels, bn_policy=bn_policy, seed=seed, verbose=verbose)
