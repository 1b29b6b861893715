"""AutoAttack through the ``pyautoattack`` package (optional extra: ``pip install gradreg[autoattack]``).

Croce, Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (arXiv 2003.01690): APGD-CE, APGD-T, FAB-T and Square in
the ``standard`` version; ``version="custom"`` with ``attacks=[...]`` runs a subset.

AutoAttack assumes inputs in [0, 1]. For other bounds [lo, hi] we run it on the affine image
u = (x − lo)/(hi − lo) ∈ [0, 1] of the input, with the model composed with the inverse map and
ε/(hi − lo) as radius (ℓp norms scale linearly), then map the result back. For [0, 1] the map
is the identity.

Example::

    attack = make("autoattack", version="custom", attacks=["apgd-ce"], n_iter=20)
    x_adv = attack(model, x, y, ThreatModel("linf", 8 / 255, (0.0, 1.0)))
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..modes import BNPolicy
from ..threat import ThreatModel
from . import ATTACKS
from .base import Attack, Labels

INSTALL_HINT = "AutoAttack needs the optional package pyautoattack: pip install gradreg[autoattack]"
_AA_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


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
                 labels: Labels = "true", bn_policy: BNPolicy = "eval", seed: int = 0,
                 verbose: bool = False) -> None:
        super().__init__(name="autoattack", norms=tuple(_AA_NORMS), labels=labels, bn_policy=bn_policy, seed=seed)
        if importlib.util.find_spec("pyautoattack") is None:  # fail at construction, not mid-evaluation
            raise ImportError(INSTALL_HINT)
        if version == "custom" and not attacks:
            raise ValueError("autoattack version='custom' needs attacks=[...], e.g. ['apgd-ce']")
        if version != "custom" and attacks:
            raise ValueError("autoattack: attacks=[...] needs version='custom'")
        self.version = version
        self.attacks = list(attacks) if attacks else None
        self.n_iter = int(n_iter) if n_iter is not None else None
        self.n_restarts = int(n_restarts) if n_restarts is not None else None
        self.verbose = bool(verbose)
        self.deterministic = False

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        try:
            from pyautoattack import AutoAttack as _AA
        except ImportError as err:
            raise ImportError(INSTALL_HINT) from err
        if threat.eps == 0 or x.shape[0] == 0:
            return x.clone()  # the ε = 0 ball is {x}; APGD's step sizes would divide by ε
        scale = threat.hi - threat.lo
        u = x if (threat.lo == 0.0 and scale == 1.0) else (x - threat.lo) / scale
        aa = _AA(_UnitBox(model, threat.lo, scale), attacks=self.attacks, device=x.device,
                 eps=threat.eps / scale, norm=_AA_NORMS[threat.norm], seed=self.seed, version=self.version)
        # None keeps the package's settings for the version (e.g. 100 iterations, 1 restart in "standard")
        for sub in (aa.apgd, aa.apgd_targeted, aa.fab):
            if self.n_iter is not None:
                sub.n_iter = self.n_iter
            if self.n_restarts is not None:
                sub.n_restarts = self.n_restarts
        logger = logging.getLogger("auto-attack")
        level = logger.level
        if not self.verbose:
            logger.setLevel(logging.WARNING)
        try:
            u_adv, _ = aa.run_standard_evaluation(u, y, batch_size=x.shape[0])
        finally:
            logger.setLevel(level)
        return u_adv if (threat.lo == 0.0 and scale == 1.0) else threat.lo + scale * u_adv


@ATTACKS.register("autoattack")
def autoattack(*, version: Literal["standard", "plus", "rand", "custom"] = "standard",
               attacks: Sequence[str] | None = None, n_iter: int | None = None, n_restarts: int | None = None,
               labels: Labels = "true", bn_policy: BNPolicy = "eval", seed: int = 0,
               verbose: bool = False) -> AutoAttack:
    """AutoAttack (Croce & Hein 2020) via pyautoattack (pip install gradreg[autoattack])."""
    return AutoAttack(version=version, attacks=attacks, n_iter=n_iter, n_restarts=n_restarts, labels=labels,
                      bn_policy=bn_policy, seed=seed, verbose=verbose)
