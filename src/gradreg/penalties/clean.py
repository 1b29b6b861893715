"""The baselines of every table: no penalty, and weight decay as a penalty term."""
from __future__ import annotations

import torch
from torch import nn

from . import PENALTIES
from .base import CleanPass, Penalty


class NoPenalty(Penalty):
    """Plain empirical risk minimization: the objective is the task loss alone."""

    default_lam = 0.0
    input_dependent = False
    uses_clean_graph = False

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass | None = None) -> torch.Tensor:
        return x.new_zeros(())


@PENALTIES.register("clean")
def clean() -> Penalty:
    """No penalty (standard training)."""
    return NoPenalty()


class WeightDecay(Penalty):
    """λ·Σ_W ‖W‖_p^p over weight matrices and kernels (biases and normalization parameters
    excluded — our choice, the usual one). ``p=2`` uses ½‖W‖₂² so its gradient is λW, the same
    as SGD's ``weight_decay=λ``; ``p=1`` uses ‖W‖₁."""

    default_lam = 5e-4
    input_dependent = False
    uses_clean_graph = False

    def __init__(self, *, p: int = 2) -> None:
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"wdecay p must be 1 or 2, got {p}")
        self.p = p
        # ‖W‖₁ grows like the parameter count, not its square: a smaller default keeps the two
        # variants of comparable strength on the C&W CNN (our choice).
        self.default_lam = 5e-4 if p == 2 else 1e-5  # type: ignore[misc]

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass | None = None) -> torch.Tensor:
        weights = [w for name, w in model.named_parameters() if w.dim() > 1 and w.requires_grad]
        if self.p == 2:
            return 0.5 * sum((w * w).sum() for w in weights)
        return sum(w.abs().sum() for w in weights)


@PENALTIES.register("wdecay")
def wdecay(*, p: int = 2) -> Penalty:
    """Weight decay as a penalty: ½‖W‖₂² (p=2) or ‖W‖₁ (p=1) over weights."""
    return WeightDecay(p=p)
