"""The projected-gradient core shared by the attacks and the penalties that need an inner
maximization (FGSM-AT, PGD-AT, ARR, TRADES, the operator-norm adversarial counterpart).

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018 (arXiv 1706.06083)::

    x⁰ = x (or a random point of the ball),
    xᵗ⁺¹ = Π_{B_ε(x) ∩ [lo, hi]} ( xᵗ + α·d(∇ₓ loss(xᵗ)) )

with d the steepest-ascent direction of unit norm (sign for ℓ∞, g/‖g‖₂ for ℓ2) and
α = ``rel_stepsize``·ε. FGSM/FGM are this loop with one step of size ε and no random start
(foolbox's view; Goodfellow et al. 2015).

Each step first clips to the box and then projects onto the ball (as IBM ART does). For ℓ∞ the
order does not matter; for ℓ2 clipping first means the part of a step that would leave the box
does not use up budget before the rescaling (our choice; any order gives a feasible point).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..modes import BNPolicy, run_mode
from ..threat import Sampler, ThreatModel

# loss_fn(logits (N, K), x_adv (N, ...)) -> per-sample loss (N,) to *maximize*
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ce_loss(y: torch.Tensor, *, targeted: bool = False) -> LossFn:
    """Per-sample cross-entropy to maximize (untargeted) or its negative (targeted at ``y``)."""
    sign = -1.0 if targeted else 1.0

    def fn(logits: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        return sign * F.cross_entropy(logits, y, reduction="none")

    return fn


def input_gradient(model: nn.Module, x: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """∇ₓ Σᵢ loss_fn(f(x))ᵢ, detached: each row is that sample's own gradient.

    (Samples do not interact in eval mode, so the gradient of the *summed* loss gives every
    sample's gradient in one backward pass.)
    """
    with torch.enable_grad():  # also inside an outer torch.no_grad()
        x = x.detach().requires_grad_(True)
        loss = loss_fn(model(x), x).sum()
        (g,) = torch.autograd.grad(loss, x)
    return g


def ascent_step(threat: ThreatModel, x: torch.Tensor, x_adv: torch.Tensor, g: torch.Tensor,
                step: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """One step of the iteration: Π_{B_ε(x) ∩ [lo, hi]}(x_adv + step·d(g)); ``step`` broadcasts
    against x (``(N, 1, ..., 1)``), ``eps`` is per sample ``(N,)``."""
    return threat.project(x, threat.clip(x_adv + step * threat.normalize(g)), eps)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    threat: ThreatModel,
    loss_fn: LossFn,
    *,
    steps: int,
    rel_stepsize: float,
    random_start: bool,
    eps: torch.Tensor | float | None = None,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sampler: Sampler | None = None,
    bn_policy: BNPolicy = "eval",
    abs_stepsize: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Maximize ``loss_fn`` over the threat model by ``steps`` steepest-ascent steps of size
    ``rel_stepsize·ε`` (sign for ℓ∞, normalized gradient for ℓ2), each followed by clipping to
    the bounds and projection onto the ball.

    ``eps`` overrides ``threat.eps``, possibly per sample ``(N,)``. ``abs_stepsize`` (input
    units, scalar or ``(N,)``) overrides ``rel_stepsize·ε``. ``start`` is an explicit starting
    point (TRADES starts at x + 0.001·N(0, I)). The model runs under ``bn_policy`` and its
    modes are restored afterwards. The result is detached and always feasible.

    Example::

        x_adv = pgd(model, x, ThreatModel("linf", 0.3, (0, 1)), ce_loss(y),
                    steps=40, rel_stepsize=2.5 / 40, random_start=True)
    """
    eps_t = threat._eps_tensor(x, eps)  # (N,)
    if abs_stepsize is None:
        step_t = rel_stepsize * eps_t  # (N,)
    else:
        step_t = threat._eps_tensor(x, abs_stepsize)
    step = step_t.view(-1, *([1] * (x.dim() - 1)))  # (N, 1, ..., 1)
    x = x.detach()
    with run_mode(model, bn_policy):
        if start is not None:
            x_adv = threat.project(x, start.detach(), eps_t)
        elif random_start:
            x_adv = threat.project(x, threat.random_start(x, generator, eps_t, sampler=sampler), eps_t)
        else:
            x_adv = x.clone()
        for _ in range(steps):
            g = input_gradient(model, x_adv, loss_fn)
            x_adv = ascent_step(threat, x, x_adv, g, step, eps_t)
    return x_adv.detach()


def pgd_until_fooled(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    *,
    steps: int,
    rel_stepsize: float,
    eps: torch.Tensor | float,
    start: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Untargeted PGD on the cross-entropy of ``y`` (the iteration of :func:`pgd`, from
    ``start``) in which every row stops at its first iterate not classified as ``y``.

    Returns ``(x_adv, fooled)``: ``x_adv`` ``(N, ...)`` is that first misclassified iterate where
    ``fooled`` ``(N,)`` is True, else the last iterate. A row's iterates are those of :func:`pgd`
    from the same start, so stopping early can only add successes (the final iterate of a row
    that was misclassified on the way may be classified correctly again) and saves the steps of
    the rows already broken. The model runs in its current mode (the caller's BatchNorm
    policy); ``eps`` may be per sample ``(N,)``. Each step costs one forward and one backward
    pass over the rows still classified as ``y``; the last iterate costs one forward pass.
    """
    eps_t = threat.eps_tensor(x, eps)  # (N,)
    step = (rel_stepsize * eps_t).view(-1, *([1] * (x.dim() - 1)))  # (N, 1, ..., 1)
    x = x.detach()
    x_adv = threat.project(x, start.detach(), eps_t)  # (N, ...)
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)  # (N,)
    active = torch.arange(len(x), device=x.device)  # (A,) rows still classified as y
    for t in range(steps + 1):
        if not active.numel():
            break
        last = t == steps
        with torch.set_grad_enabled(not last):
            xa = x_adv[active].requires_grad_(not last)  # (A, ...)
            logits = model(xa)  # (A, K)
            hit = logits.argmax(dim=1) != y[active]  # (A,)
            fooled[active[hit]] = True
            if last:
                break
            loss = F.cross_entropy(logits, y[active], reduction="none").sum()
            (g,) = torch.autograd.grad(loss, xa)
        keep = ~hit
        active = active[keep]
        x_adv[active] = ascent_step(threat, x[active], xa.detach()[keep], g[keep], step[active], eps_t[active])
    return x_adv.detach(), fooled
