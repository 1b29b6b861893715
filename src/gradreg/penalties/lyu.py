"""Lyu's dual-norm gradient-regularization family (SPEC §2).

Lyu, Huang, Liang, "A Unified Gradient Regularization Family for Adversarial Examples",
ICDM 2015 (arXiv 1511.06385). The first-order expansion of the worst case over an ℓp ball
of radius σ,

    max_{‖r‖ₚ≤σ} L(x + r) ≈ L(x) + σ·‖∇ₓL(x)‖_{p*},   1/p + 1/p* = 1,

is attained at  r* = σ·sign(g)⊙|g|^{p*−1} / ‖g‖_{p*}^{p*−1}  (g = ∇ₓL(x)):
p = ∞ → r* = σ·sign(g), penalty σ‖g‖₁;  p = 2 → r* = σ·g/‖g‖₂, penalty σ‖g‖₂;
p = 1 → all of σ on argmax|gᵢ| (ties split evenly), penalty σ‖g‖_∞.

Two solvers, both used as ``loss = L(x) + λ·penalty``:

- ``solver="exact"``: penalty = σ·mean_i ‖g_i‖_{p*}, differentiated by double backprop.
- ``solver="onestep"``: penalty = mean_i [L(x_i + r*_i) − L(x_i)] with r* detached. With
  λ = 1 the objective is exactly L(x + r*): the paper's "train on the one-step adversarial
  example". For small σ the penalty value is σ‖g‖_{p*} + O(σ²).

λ and σ: the paper's objective is L(x) + σ‖g‖_{p*}, so σ is the scale and λ = 1 is the
paper's weight (``default_lam = 1``); a λ ≠ 1 with ``onestep`` gives the mix
(1 − λ)·L(x) + λ·L(x + r*).

Warning — our choices, not the paper's:
  * default σ (input units) per threat norm: 0.1 for ℓ∞, 1.0 for ℓ2, 10.0 for ℓ1 (not tuned).
  * ``onestep`` does not clip x + r* to the data bounds unless ``bounds`` is given: the
    paper's expansion is unconstrained.
  * For a multi-head model the penalty uses the main task's loss only.
  * The ``onestep`` perturbed pass runs in the mode of the clean pass (train-mode BatchNorm
    normalizes x + r* with its own batch statistics) without updating BatchNorm running
    statistics: perturbed inputs never enter them.

Example::

    pen = make("lyu", norm="linf", sigma=0.1, solver="onestep")
    loss = F.cross_entropy(model(x), y) + 1.0 * pen(model, x, y)  # = CE(model(x + r*), y)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..threat import ThreatModel, canonical_norm, dual_norm, same_layout
from . import PENALTIES
from .base import CleanPass, Penalty, main_targets
from .datagrad import grad_norm, same_mode_frozen_stats

DEFAULT_SIGMA = {"linf": 0.1, "l2": 1.0, "l1": 10.0}


def lyu_direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Unit-ℓp maximizer of ⟨g, r⟩: r*/σ, per sample, detached (zero where g = 0)."""
    return ThreatModel(norm=norm).normalize(g.detach())


class Lyu(Penalty):
    """σ·‖∇ₓL‖_{p*} (exact) or L(x + r*) − L(x) (onestep) for an ℓp threat of radius σ."""

    needs_input_grad = True
    default_lam = 1.0

    def __init__(self, *, norm: str = "linf", sigma: float | None = None, solver: str = "exact",
                 bounds: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.norm = canonical_norm(norm)
        self.sigma = float(DEFAULT_SIGMA[self.norm] if sigma is None else sigma)
        if not self.sigma >= 0:
            raise ValueError(f"lyu sigma must be ≥ 0, got {sigma!r}")
        if solver not in ("exact", "onestep"):
            raise ValueError(f"lyu solver must be 'exact' or 'onestep', got {solver!r}")
        self.solver = solver
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))
        # onestep uses a detached gradient and leaves its −L(x) to the objective in fused mode:
        # with λ = 1 the step is then exactly one forward/backward pass on x + r*
        self.double_backward = self.uses_clean_graph = solver == "exact"  # type: ignore[misc]
        self.clean_weight = -1.0 if solver == "onestep" else 0.0  # type: ignore[misc]

    def perturbation(self, g: torch.Tensor) -> torch.Tensor:
        """r* = σ·ψ(g) for the threat norm, detached ``(N, C, H, W)``."""
        return self.sigma * lyu_direction(g, self.norm)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass | None = None) -> torch.Tensor:
        ctx = self.context(model, x, y, ctx)
        if self.solver == "exact":
            g = ctx.input_grad(0)  # (N, C, H, W), differentiable
            return self.sigma * grad_norm(g, dual_norm(self.norm)).mean()
        g = ctx.detached_input_grad(0)
        x_adv = same_layout(ctx.x.detach() + self.perturbation(g), ctx.x)
        if self.bounds is not None:
            x_adv = x_adv.clamp(*self.bounds)
        target = main_targets(ctx.y)
        with same_mode_frozen_stats(model):
            loss_adv = F.cross_entropy(model(x_adv), target)
        loss_clean = F.cross_entropy(ctx.logits, target)
        return loss_adv - (loss_clean.detach() if ctx.fused else loss_clean)


@PENALTIES.register("lyu")
def lyu(*, norm: str = "linf", sigma: float | None = None, solver: str = "exact",
        bounds: tuple[float, float] | None = None) -> Penalty:
    """Lyu et al. 2015: σ·‖∇ₓL‖_{p*} for an ℓp threat (exact), or the one-step L(x + r*) − L(x)."""
    return Lyu(norm=norm, sigma=sigma, solver=solver, bounds=bounds)
