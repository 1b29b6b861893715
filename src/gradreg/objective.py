"""The one objective (DataGrad view, Ororbia et al. 2017, SPEC §1):

    J(θ) = w₀·Σ_heads CE_h(x, y) + Σᵢ λᵢ·Rᵢ(model, x, y)

Every method in gradreg is this objective with other terms: ``clean`` has none, GN/SGR/
DataGrad/Lyu add an input-gradient penalty, Madry's PGD-AT sets w₀ = 0 and adds the loss on
PGD examples. How a step of it is computed (the shared clean pass, fused mode, the
double-backward kernels) is :mod:`gradreg.schedule`'s business.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from .penalties.base import Penalty
from .schedule import BatchNoise, ObjectiveOutput, run_objective

__all__ = ["Objective", "ObjectiveOutput"]


class Objective(nn.Module):
    """task loss + Σ λᵢ·penaltyᵢ. Penalty state is part of ``state_dict`` (checkpointed).
    ``fast_paths=False`` computes every step as the plain composition (:mod:`gradreg.schedule`)."""

    def __init__(self, terms: Sequence[tuple[str, Penalty, float]], *, task_weight: float = 1.0,
                 fast_paths: bool = True) -> None:
        super().__init__()
        names = [name for name, _, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"penalty names must be unique, got {names}")
        for _, pen, lam in terms:
            # a penalty may refuse a λ that makes its objective ill-posed (DataGrad's fd solver: λ > φ)
            check = getattr(pen, "check_lam", None)
            if check is not None:
                check(float(lam), task_weight=float(task_weight))
        self.penalties = nn.ModuleDict({name: pen for name, pen, _ in terms})
        self.lams = {name: float(lam) for name, _, lam in terms}
        self.task_weight = float(task_weight)
        self.fast_paths = bool(fast_paths)

    def setup(self, model: nn.Module, train_x: torch.Tensor, bounds: tuple[float, float] | None = None) -> None:
        """``setup`` of every penalty (see :meth:`Penalty.setup`)."""
        for pen in self.terms().values():
            pen.setup(model, train_x, bounds)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                index: torch.Tensor | None = None, noise: BatchNoise | None = None) -> ObjectiveOutput:
        terms = {name: (pen, self.lams[name]) for name, pen in self.terms().items()}
        return run_objective(terms, self.task_weight, model, x, y, index=index, noise=noise,
                             fast_paths=self.fast_paths)

    def terms(self) -> dict[str, Penalty]:
        """The penalties by name (the ``ModuleDict`` holds them for ``state_dict``)."""
        return {name: cast(Penalty, pen) for name, pen in self.penalties.items()}

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """``load_state_dict`` for a checkpoint, also one written by an earlier gradreg: state a
        penalty no longer keeps (its ``legacy_state``) is dropped; anything else that does not
        fit is a one-line ``ValueError``."""
        state = dict(state)
        for name, pen in self.penalties.items():
            for key in getattr(pen, "legacy_state", ()):
                state.pop(f"penalties.{name}.{key}", None)
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as err:  # a shape mismatch: the state belongs to another model or data set
            raise ValueError(f"the checkpoint's penalty state does not fit: {str(err).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ValueError(f"the checkpoint's penalty state does not fit this gradreg: missing "
                             f"{sorted(missing) or 'nothing'}, unexpected {sorted(unexpected) or 'nothing'}")
