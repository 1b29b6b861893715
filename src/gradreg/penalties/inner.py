"""What the inner-maximization penalties share (adversarial training, ARR/TRADES, the
operator-norm adversarial counterpart, SGR's attack sources): the threat model of the inner
attack with its defaults, the one-step attack read off the shared clean pass, and the clean
logits in the mode of a perturbed pass, and the labels an attack ascends (true or predicted)."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..attacks.pgd_core import ascent_step
from ..modes import BNPolicy, perturbed_policy, run_mode
from ..cleanpass import CleanPass
from ..threat import ThreatModel, canonical_norm, parse_eps

# Default radii for [0, 1] images of CIFAR scale (our choice; the usual ones), scaled by the
# width of the data set's box for other bounds.
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 10.0}

ATTACK_LABELS = ("true", "predicted")
"""What an inner attack ascends: the cross-entropy with the true label (Madry et al. 2018), or
with the model's predicted label, so the example does not carry the true label into training
("label leaking", Kurakin, Goodfellow, Bengio, ICLR 2017; the SGR paper's FGSM/PGD rows)."""


def check_labels(labels: str) -> str:
    if labels not in ATTACK_LABELS:
        raise ValueError(f"labels must be one of {ATTACK_LABELS}, got {labels!r}")
    return labels


def attack_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass, *, labels: str,
                  bn_policy: BNPolicy) -> torch.Tensor:
    """Main-task labels ``(N,)`` for the inner attack: ``y``'s main column (``"true"``), or the
    argmax of the model's clean logits in the attack's mode (``"predicted"``): read off the shared
    clean pass when the reuse rule allows it, from a pass without gradient under ``bn_policy``
    otherwise (never moving BatchNorm statistics)."""
    y_main = y if y.dim() == 1 else y[:, 0]
    if labels == "true":
        return y_main
    shared = ctx.logits_in(model, bn_policy)
    if shared is not None:
        return shared.detach().argmax(dim=1)
    with torch.no_grad(), run_mode(model, "frozen" if bn_policy == "train" else bn_policy):
        return model(x).argmax(dim=1)  # (N,)


def resolve_eps(norm: str, eps: float | str | None, bounds: tuple[float, float]) -> float:
    """ε in input units: the given one, or :data:`DEFAULT_EPS` times the width of the box."""
    if eps is not None:
        return parse_eps(eps)
    return DEFAULT_EPS[canonical_norm(norm)] * (float(bounds[1]) - float(bounds[0]))


def clean_logits(model: nn.Module, x: torch.Tensor, ctx: CleanPass, policy: BNPolicy) -> torch.Tensor:
    """Differentiable clean main-head logits ``(N, K)`` computed in the same mode as the perturbed
    pass under ``policy``, so the two branches of a consistency penalty are comparable: the
    shared clean pass when the reuse rule allows it, a pass under that policy otherwise (which
    never updates BatchNorm statistics unless ``policy="train"``)."""
    eff = perturbed_policy(model, policy)
    shared = ctx.logits_in(model, eff)
    if shared is not None:
        return shared
    with run_mode(model, eff):
        return model(x)


def one_step_from_clean_pass(ctx: CleanPass, model: nn.Module, threat: ThreatModel, *,
                             rel_stepsize: float, bn_policy: BNPolicy) -> torch.Tensor | None:
    """x_adv of one CE-ascent step without random start (FGSM/FGM: ``rel_stepsize`` 1) from the
    shared clean pass's input gradient, detached; None when that pass cannot stand in for the
    attack's own pass under ``bn_policy`` (then the caller runs the attack). Same numbers as
    ``pgd(..., steps=1, random_start=False)``: the gradient of Σᵢ CE(f(xᵢ), yᵢ) at x."""
    g = ctx.detached_input_grad_in(model, bn_policy)  # (N, ...)
    if g is None:
        return None
    x = ctx.x.detach()
    eps_t = threat.eps_tensor(x)  # (N,)
    step = (rel_stepsize * eps_t).view(-1, *([1] * (x.dim() - 1)))
    return ascent_step(threat, x, x, g, step, eps_t).detach()


class AttackPenalty(Protocol):
    @property
    def threat(self) -> ThreatModel: ...

    @property
    def rel_stepsize(self) -> float: ...

    @property
    def bn_policy(self) -> BNPolicy: ...

    def one_step(self) -> bool: ...

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> torch.Tensor: ...


def adversarial_batch(pen: AttackPenalty, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: CleanPass, *, threat: ThreatModel | None = None) -> torch.Tensor:
    """The inner attack's x_adv: read off the shared clean pass when the penalty is a one-step
    CE attack without random start and that pass may stand in for the attack's, from the
    penalty's own ``attack`` otherwise. ``threat``: the step's threat when it differs from
    ``pen.threat`` (an ε ramp); the penalty's ``attack`` applies the same one itself."""
    x_adv = None
    if pen.one_step():
        x_adv = one_step_from_clean_pass(ctx, model, pen.threat if threat is None else threat, rel_stepsize=pen.rel_stepsize,
                                         bn_policy=pen.bn_policy)
    return pen.attack(model, x, y, ctx) if x_adv is None else x_adv
