"""The baselines of every table: no penalty, and weight decay as a penalty term."""
from __future__ import annotations

import torch
from torch import nn

from . import PENALTIES
from ..cleanpass import total
from .base import CleanPass, Penalty, Requirements, Term

_WEIGHTS_ONLY = Requirements(clean_graph=False, input_dependent=False)


@PENALTIES.register("clean")
class NoPenalty(Penalty):
    """No penalty (standard training): the objective is the task loss alone."""

    default_lam = 0.0
    requires = _WEIGHTS_ONLY

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        return Term(x.new_zeros(()))


@PENALTIES.register("wdecay")
class WeightDecay(Penalty):
    """Weight decay as a penalty: ½‖W‖₂² (p=2) or ‖W‖₁ (p=1) over weights.

    λ·Σ_W ‖W‖_p^p over weight matrices and kernels (biases and normalization parameters
    excluded — our choice, the usual one). ``p=2`` uses ½‖W‖₂² so its gradient is λW, the same
    as SGD's ``weight_decay=λ``; ``p=1`` uses ‖W‖₁."""

    default_lam = 5e-4
    requires = _WEIGHTS_ONLY

    def __init__(self, *, p: int = 2) -> None:
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"wdecay p must be 1 or 2, got {p}")
        self.p = p
        # ‖W‖₁ grows like the parameter count, not its square: a smaller default keeps the two
        # variants of comparable strength on the C&W CNN (our choice).
        self.default_lam = 5e-4 if p == 2 else 1e-5

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        weights = [w for name, w in model.named_parameters() if w.dim() > 1 and w.requires_grad]
        if self.p == 2:
            return Term(0.5 * total((w * w).sum() for w in weights))
        return Term(total(w.abs().sum() for w in weights))
