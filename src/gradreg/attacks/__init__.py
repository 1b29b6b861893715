"""Attacks (registry ``ATTACKS``); ``make(name, **params)`` returns an attack called as
``attack(model, x, y, threat) -> x_adv``."""
from __future__ import annotations

from ..registry import Registry
from .pgd_core import ce_loss, input_gradient, pgd

ATTACKS: Registry = Registry("attack")


def make(name: str, **params: object):  # type: ignore[no-untyped-def]
    return ATTACKS.make(name, **params)


__all__ = ["ATTACKS", "make", "pgd", "ce_loss", "input_gradient"]
