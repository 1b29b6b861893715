"""CURE: curvature regularization by a finite difference of input gradients (SPEC §7).

Moosavi-Dezfooli, Fawzi, Uesato, Frossard, "Robustness via curvature regularization, and vice
versa", CVPR 2019 (arXiv 1811.09716)::

    R(x) = ‖∇ₓℓ(x + h·z) − ∇ₓℓ(x)‖₂²,    z = sign ∇ₓℓ(x) / ‖sign ∇ₓℓ(x)‖₂

a finite-difference estimate of ‖H z‖² (H the Hessian of ℓ in x) along the direction in which
the loss grows fastest; z is held fixed (not differentiated), both gradients are (double
backprop). Trained as ℓ(x) + λ·R(x) (task weight 1).

The clean gradient is the shared clean pass's graph-keeping input gradient when the reuse rule
allows it (it also gives z), so a CURE step costs the clean pass and one double-backprop pass
at x + h·z.

**h and its schedule.** The paper increases h during training; the authors' code defaults to
h = 3 and λ = 4 on standardized CIFAR-10 inputs (their ``regularizer(..., h=3., lambda_=4)``,
and a per-epoch list of h values in their example). gradreg states inputs before
normalization, so these numbers do not carry over unchanged. Our choices: ``h`` (ℓ2 length in
input units) defaults to 1.5, λ to 4; ``h_ramp_steps`` ramps h linearly from ``h/ramp_steps``
to ``h`` over that many training steps (0, the default: constant h). The step counter is a
buffer, so a resumed or 2-rank run ramps alike; it advances only while the model trains.

Our choices as well: ℓ is the main head's cross-entropy and gradients are per sample (the
gradient of Σᵢ ℓᵢ; the authors' code takes the gradient of the batch mean, which scales R by
1/N² — absorbed in λ); the paper's squared norm (the authors' code returns the unsquared norm);
x + h·z is not clipped to the input bounds (a small step; the paper does not clip); the
perturbed pass runs under ``perturbed_bn_policy="frozen"`` (the authors evaluate both passes
in eval mode: ``perturbed_bn_policy="eval"``). A sample whose gradient is zero gets z = 0.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modes import BNPolicy, check_policy, perturbed_policy
from . import PENALTIES
from .base import CleanPass, Penalty, Requirements, Term
from .norms import _TINY, safe_l2
from .passes import clean_loss_and_grad, loss_and_grad_at


def sign_direction(g: torch.Tensor) -> torch.Tensor:
    """z = sign(g)/‖sign(g)‖₂ per sample, detached; 0 where g = 0. ``(N, ...) -> (N, ...)``"""
    s = g.detach().sign()
    n = safe_l2(s).view(-1, *([1] * (g.dim() - 1)))
    return torch.where(n > 0, s / n.clamp_min(_TINY), torch.zeros_like(s))


@PENALTIES.register("cure")
class CURE(Penalty):
    """CURE (Moosavi-Dezfooli et al. 2019): ‖∇ℓ(x + h·z) − ∇ℓ(x)‖², z = sign ∇ℓ(x) normalized."""

    default_lam = 4.0
    requires = Requirements(input_grad=True, double_backward=True, clean_graph=True)
    step: torch.Tensor  # training steps taken (the h ramp's clock)

    def __init__(self, *, h: float = 1.5, h_ramp_steps: int = 0, perturbed_bn_policy: BNPolicy = "frozen") -> None:
        super().__init__()
        if not h > 0:
            raise ValueError(f"cure h must be > 0, got {h!r}")
        if h_ramp_steps < 0:
            raise ValueError(f"cure h_ramp_steps must be ≥ 0, got {h_ramp_steps!r}")
        self.h = float(h)
        self.h_ramp_steps = int(h_ramp_steps)
        self.perturbed_bn_policy = check_policy(perturbed_bn_policy)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def current_h(self) -> float:
        """h at this step of the ramp (``h`` once the ramp is over, or without one)."""
        if self.h_ramp_steps == 0:
            return self.h
        return self.h * min(1.0, (int(self.step) + 1) / self.h_ramp_steps)

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        policy = perturbed_policy(model, self.perturbed_bn_policy)
        h = self.current_h()
        if model.training:
            self.step += 1
        _, g = clean_loss_and_grad(model, x, y, ctx, policy=policy, create_graph=True)  # (N, ...)
        z = sign_direction(g)
        _, g_h = loss_and_grad_at(model, x.detach() + h * z, y, policy=policy, create_graph=True,
                                  fast=ctx.fast)
        return Term((g_h - g).flatten(1).pow(2).sum(dim=1).mean())
