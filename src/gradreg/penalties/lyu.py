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

from ..modes import frozen_stats
from ..threat import canonical_norm, dual_norm, same_layout, steepest_direction
from . import PENALTIES
from .base import CleanPass, Penalty, Requirements, Term, main_targets
from .norms import grad_norm

DEFAULT_SIGMA = {"linf": 0.1, "l2": 1.0, "l1": 10.0}


@PENALTIES.register("lyu")
class Lyu(Penalty):
    """Lyu et al. 2015: σ·‖∇ₓL‖_{p*} for an ℓp threat (exact), or the one-step L(x + r*) − L(x)."""

    default_lam = 1.0

    def __init__(self, *, norm: str = "linf", sigma: float | None = None, solver: str = "exact",
                 bounds: tuple[float, float] | None = None) -> None:
        super().__init__(bounds=bounds)
        self.norm = canonical_norm(norm)
        self.sigma = float(DEFAULT_SIGMA[self.norm] if sigma is None else sigma)
        if not self.sigma >= 0:
            raise ValueError(f"lyu sigma must be ≥ 0, got {sigma!r}")
        if solver not in ("exact", "onestep"):
            raise ValueError(f"lyu solver must be 'exact' or 'onestep', got {solver!r}")
        self.solver = solver
        self.clip = bounds is not None  # the paper's expansion is unconstrained (module doc)
        # onestep: a detached gradient, and its −L(x) is the penalty's clean_coeff: with λ = 1 the
        # step can then be exactly one forward/backward pass on x + r*
        exact = solver == "exact"
        self.requires = Requirements(input_grad=True, double_backward=exact, clean_graph=exact,
                                     clean_coeff=0.0 if exact else -1.0)

    def perturbation(self, g: torch.Tensor) -> torch.Tensor:
        """r* = σ·ψ(g) for the threat norm, detached ``(N, C, H, W)``."""
        return self.sigma * steepest_direction(g.detach(), self.norm)

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        if self.solver == "exact":
            g = ctx.input_grad(0)  # (N, C, H, W), differentiable
            return Term(self.sigma * grad_norm(g, dual_norm(self.norm)).mean())
        g = ctx.detached_input_grad(0)
        x_adv = same_layout(ctx.x.detach() + self.perturbation(g), ctx.x)
        if self.clip:
            x_adv = x_adv.clamp(*self.bounds)
        target = main_targets(ctx.y)
        with frozen_stats(model):
            loss_adv = F.cross_entropy(model(x_adv), target)
        loss_clean = F.cross_entropy(ctx.logits, target).detach()  # its gradient: clean_coeff = −1
        return Term(loss_adv - loss_clean)  # clean_coeff −1: declared in requires
