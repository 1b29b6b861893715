"""The projected-gradient core shared by the attacks and the penalties that need an inner
maximization (FGSM-AT, PGD-AT, ARR, TRADES, the operator-norm adversarial counterpart).

FGSM/FGM are this loop with one step of size ε and no random start (foolbox's view).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..modes import BNPolicy, run_mode
from ..threat import ThreatModel

# loss_fn(logits (N, K), x_adv (N, ...)) -> per-sample loss (N,) to *maximize*
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ce_loss(y: torch.Tensor, *, targeted: bool = False) -> LossFn:
    """Per-sample cross-entropy to maximize (untargeted) or its negative (targeted at ``y``)."""
    sign = -1.0 if targeted else 1.0

    def fn(logits: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        return sign * F.cross_entropy(logits, y, reduction="none")

    return fn


def input_gradient(model: nn.Module, x: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """∇ₓ Σᵢ loss_fn(f(x))ᵢ, detached: each row is that sample's own gradient."""
    x = x.detach().requires_grad_(True)
    loss = loss_fn(model(x), x).sum()
    (g,) = torch.autograd.grad(loss, x)
    return g


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
    bn_policy: BNPolicy = "eval",
) -> torch.Tensor:
    """Maximize ``loss_fn`` over the threat model by ``steps`` steepest-ascent steps of size
    ``rel_stepsize·ε`` (sign for ℓ∞, normalized gradient for ℓ2), each followed by projection.

    ``eps`` overrides ``threat.eps``, possibly per sample ``(N,)``. ``start`` is an explicit
    starting point (TRADES starts at x + 0.001·N(0, I)). The model runs under ``bn_policy``
    and its modes are restored afterwards. The result is detached.
    """
    eps_t = threat._eps_tensor(x, eps)  # (N,)
    step = (rel_stepsize * eps_t).view(-1, *([1] * (x.dim() - 1)))
    x = x.detach()
    with run_mode(model, bn_policy):
        if start is not None:
            x_adv = threat.project(x, start.detach(), eps_t)
        elif random_start:
            x_adv = threat.project(x, threat.random_start(x, generator, eps_t), eps_t)
        else:
            x_adv = x.clone()
        for _ in range(steps):
            g = input_gradient(model, x_adv, loss_fn)
            x_adv = threat.project(x, x_adv + step * threat.normalize(g), eps_t)
    return x_adv.detach()
