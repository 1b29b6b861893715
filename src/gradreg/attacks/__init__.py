"""Attacks (registry ``ATTACKS``); ``make(name, **params)`` returns an attack called as
``attack(model, x, y, threat) -> x_adv``, with ``perturb_multi``/``success_curve`` for a whole
list of ε in one call (see :mod:`gradreg.attacks.base`).

Families, one module each: :mod:`.gradient` (fgsm, fgm, pgd, tpgd), :mod:`.deepfool`,
:mod:`.noise` (uniform, gaussian), :mod:`.lrc`, :mod:`.autoattack` (optional extra).
"""
from __future__ import annotations

from ..registry import Registry
from .base import Attack
from .pgd_core import ce_loss, input_gradient, pgd

ATTACKS: Registry[Attack] = Registry("attack", entry_point_group="gradreg.attacks")

from . import autoattack, deepfool, gradient, lrc, noise  # noqa: E402,F401  (registration side effects)


def make(name: str, **params: object) -> Attack:
    """Build a registered attack: ``make("pgd", steps=40, rel_stepsize=0.1)``."""
    return ATTACKS.make(name, **params)


__all__ = ["ATTACKS", "Attack", "make", "pgd", "ce_loss", "input_gradient"]
