"""The regularizer family behind one objective: task loss + Σ λᵢ·penaltyᵢ.

``make(name, **params)`` builds a registered penalty; every penalty is called as
``penalty(model, x, y)`` and returns a scalar (mean over the batch). Inside the training loop
the objective calls ``penalty.term(model, x, y, ctx)`` instead (:mod:`.base`).
"""
from __future__ import annotations

import importlib

from ..registry import Registry
from .base import CleanPass, Penalty, Requirements, Term, main_targets, split_targets

PENALTIES: Registry[Penalty] = Registry("method", entry_point_group="gradreg.penalties")

# One module per family; importing registers its members.
_FAMILIES = ("clean", "datagrad", "lyu", "sgr", "arr", "opnorm", "advtrain", "noise_aug", "singlestep", "gradalign",
             "cure", "linearity", "jacreg")
for _family in _FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")

# Ross & Doshi-Velez's input gradient regularization is GN (SPEC §7): a second name, not a second implementation.
PENALTIES.register_alias("igr", "gn", doc="Input gradient regularization (Ross & Doshi-Velez 2018): an alias of gn, "
                         "½‖∇ₓL‖₂² (their λ‖∇ₓL‖₂² with λ halved)")


def make(name: str, **params: object) -> Penalty:
    """Build a registered penalty: ``make("gn")``, ``make("datagrad", p=1, solver="fd")``."""
    return PENALTIES.make(name, **params)


__all__ = ["PENALTIES", "Penalty", "Requirements", "Term", "CleanPass", "make", "split_targets", "main_targets"]
