"""Adversarial training as a term of the one objective: FGSM-AT and PGD-AT (SPEC §6).

Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015
(the FGSM mix, α = 0.5)::

    J(θ) = α·L(x) + (1 − α)·L(x + ε·sign ∇ₓL(x))

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018 (train on PGD examples only)::

    J(θ) = L(x*),   x* = PGD_ε(x): random start in the ε-ball, K projected steepest-ascent steps

In gradreg's objective ``task_weight·L(x) + λ·penalty`` both are the penalty ``L(x_adv)`` with
the method's task weight: FGSM-AT has ``task_weight = α = 0.5`` and ``default_lam = 1 − α =
0.5``; PGD-AT has ``task_weight = 0`` and ``default_lam = 1``. ``L`` is the task loss of the
objective, i.e. the sum of cross-entropies over all heads of a multi-task model (our choice);
the attack maximizes the main head's cross-entropy with the true label.

Modes and BatchNorm (our choice; the papers train BatchNorm on the adversarial batches):

- the attack runs under ``bn_policy`` (``"eval"`` by default): running statistics are used and
  never updated, dropout is off;
- the loss on ``x_adv`` (whose gradient flows into θ) runs under ``perturbed_bn_policy``
  (``"frozen"`` by default): train mode with the adversarial batch's statistics, but its
  running statistics are restored, so only the loop's clean pass updates them. Pass
  ``perturbed_bn_policy="train"`` for Madry's behaviour. A model in eval mode (evaluating the
  penalty, not training) stays in eval mode.

Example::

    pen = make("pgd-at", eps=8 / 255, steps=10, rel_stepsize=0.25)
    objective = Objective([("pgd-at", pen, pen.default_lam)], task_weight=pen.task_weight)

This module also holds the pieces that the other inner-maximization penalties (ARR/TRADES,
the operator-norm adversarial counterpart) share: :func:`make_threat`,
:func:`perturbed_policy` and :func:`clean_logits`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..attacks.pgd_core import ascent_step, ce_loss, pgd
from ..models.base import forward_all
from ..modes import BN_POLICIES, BNPolicy, run_mode
from ..threat import ThreatModel, canonical_norm
from . import PENALTIES
from .base import CleanPass, Penalty, main_targets, sampler_of, split_targets

# Default radii in input units for [0, 1] images of CIFAR scale (our choice; the usual ones).
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 10.0}


def make_threat(norm: str, eps: float | str | None, bounds: tuple[float, float]) -> ThreatModel:
    """The threat model of an inner maximization; ``eps=None`` takes :data:`DEFAULT_EPS`."""
    norm = canonical_norm(norm)
    return ThreatModel(norm=norm, eps=DEFAULT_EPS[norm] if eps is None else eps, bounds=tuple(bounds))


def check_policy(policy: str) -> BNPolicy:
    if policy not in BN_POLICIES:
        raise ValueError(f"unknown BatchNorm policy {policy!r}; use one of {BN_POLICIES}")
    return policy  # type: ignore[return-value]


def perturbed_policy(model: nn.Module, policy: BNPolicy) -> BNPolicy:
    """The policy of a pass whose gradient flows into θ: ``policy`` while the model trains,
    ``"eval"`` while it is in eval mode (evaluating a penalty never switches batch statistics
    or dropout on)."""
    return policy if model.training else "eval"


def clean_logits(model: nn.Module, x: torch.Tensor, ctx: CleanPass | None, policy: BNPolicy) -> torch.Tensor:
    """Differentiable clean main-head logits ``(N, K)`` computed in the same mode as the perturbed
    pass under ``policy``, so the two branches of a consistency penalty are comparable.

    The shared clean pass is reused when it ran in that mode (the model's own mode). Without
    a shared pass the clean pass runs under ``policy`` too, so a standalone call never updates
    BatchNorm statistics unless ``policy="train"``."""
    eff = perturbed_policy(model, policy)
    if ctx is not None and (eff == "eval") == (not model.training):
        return ctx.logits
    with run_mode(model, eff):
        return model(x)


def one_step_from_clean_pass(ctx: CleanPass | None, model: nn.Module, threat: ThreatModel, *,
                             rel_stepsize: float, bn_policy: BNPolicy) -> torch.Tensor | None:
    """x_adv of one CE-ascent step without random start (FGSM/FGM: ``rel_stepsize`` 1) from the
    shared clean pass's input gradient, detached; None when that pass cannot stand in for the
    attack's own pass under ``bn_policy`` (then the caller runs the attack). Same numbers as
    ``pgd(..., steps=1, random_start=False)``: the gradient of Σᵢ CE(f(xᵢ), yᵢ) at x."""
    if ctx is None or not ctx.x_in.requires_grad or not ctx.shares_mode(model, bn_policy):
        return None
    g = ctx.detached_input_grad(0)  # (N, ...)
    x = ctx.x.detach()
    eps_t = threat._eps_tensor(x, None)  # (N,)
    step = (rel_stepsize * eps_t).view(-1, *([1] * (x.dim() - 1)))
    return ascent_step(threat, x, x, g, step, eps_t).detach()


def adversarial_batch(pen: Penalty, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: CleanPass | None) -> torch.Tensor:
    """The inner attack's x_adv for an attack penalty (``threat``, ``rel_stepsize``,
    ``bn_policy``, ``attack``): read off the shared clean pass when the penalty is a one-step
    attack that asked for its input gradient (``needs_input_grad``) and that pass ran in the
    attack's mode, from the penalty's own ``attack`` otherwise."""
    x_adv = None
    if pen.needs_input_grad:
        x_adv = one_step_from_clean_pass(ctx, model, pen.threat, rel_stepsize=pen.rel_stepsize,
                                         bn_policy=pen.bn_policy)
    return pen.attack(model, x, y, ctx=ctx) if x_adv is None else x_adv


class AdversarialLoss(Penalty):
    """``L(x_adv)`` with ``x_adv`` from the shared PGD core (FGSM is PGD with one step of size ε
    and no random start). Mean over the batch; summed over the heads of a multi-task model."""

    def __init__(self, *, eps: float | str | None = None, norm: str = "linf", steps: int = 10,
                 rel_stepsize: float = 0.25, random_start: bool = True,
                 bounds: tuple[float, float] = (0.0, 1.0), bn_policy: BNPolicy = "eval",
                 perturbed_bn_policy: BNPolicy = "frozen") -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        self.threat = make_threat(norm, eps, bounds)
        self.steps = int(steps)
        self.rel_stepsize = float(rel_stepsize)
        self.random_start = bool(random_start)
        self.bn_policy = check_policy(bn_policy)
        self.perturbed_bn_policy = check_policy(perturbed_bn_policy)
        # A one-step attack without random start (FGSM-AT) reads the shared clean pass's input
        # gradient when that pass ran in the attack's mode, instead of a pass of its own.
        self.needs_input_grad = self.steps == 1 and not self.random_start  # type: ignore[misc]
        self.double_backward = False  # type: ignore[misc]

    uses_clean_graph = False  # L(x_adv) only; the clean term is the objective's task weight

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator | None = None, ctx: CleanPass | None = None) -> torch.Tensor:
        """The detached adversarial batch, computed under ``bn_policy``."""
        with torch.enable_grad():
            return pgd(model, x, self.threat, ce_loss(main_targets(y)), steps=self.steps,
                       rel_stepsize=self.rel_stepsize, random_start=self.random_start, generator=generator,
                       sampler=sampler_of(ctx), bn_policy=self.bn_policy)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass | None = None) -> torch.Tensor:
        x_adv = adversarial_batch(self, model, x, y, ctx)
        with run_mode(model, perturbed_policy(model, self.perturbed_bn_policy)):
            outputs = forward_all(model, x_adv)  # per head: (N, K_h)
        return sum(F.cross_entropy(out, t) for out, t in zip(outputs, split_targets(y)))


class FGSMAdversarialTraining(AdversarialLoss):
    default_lam = 0.5  # 1 − α
    task_weight = 0.5  # α


class PGDAdversarialTraining(AdversarialLoss):
    default_lam = 1.0
    task_weight = 0.0


@PENALTIES.register("fgsm-at")
def fgsm_at(*, eps: float | str | None = None, norm: str = "linf", bounds: tuple[float, float] = (0.0, 1.0),
            bn_policy: BNPolicy = "eval", perturbed_bn_policy: BNPolicy = "frozen") -> Penalty:
    """FGSM adversarial training (Goodfellow et al. 2015): α·L(x) + (1−α)·L(x + ε·sign g), α = 0.5."""
    return FGSMAdversarialTraining(eps=eps, norm=norm, steps=1, rel_stepsize=1.0, random_start=False,
                                   bounds=bounds, bn_policy=bn_policy, perturbed_bn_policy=perturbed_bn_policy)


@PENALTIES.register("pgd-at")
def pgd_at(*, eps: float | str | None = None, norm: str = "linf", steps: int = 10, rel_stepsize: float = 0.25,
           random_start: bool = True, bounds: tuple[float, float] = (0.0, 1.0), bn_policy: BNPolicy = "eval",
           perturbed_bn_policy: BNPolicy = "frozen") -> Penalty:
    """PGD adversarial training (Madry et al. 2018): the loss on PGD examples only (task weight 0).

    Defaults (our choice): ℓ∞, ε = 8/255, 10 steps of 0.25·ε, random start."""
    return PGDAdversarialTraining(eps=eps, norm=norm, steps=steps, rel_stepsize=rel_stepsize,
                                  random_start=random_start, bounds=bounds, bn_policy=bn_policy,
                                  perturbed_bn_policy=perturbed_bn_policy)
