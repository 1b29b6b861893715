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

Bounds and default ε come from the data set (``setup``) unless given (:mod:`.inner`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..attacks.pgd_core import ce_loss, pgd
from ..models.base import forward_all
from ..modes import BNPolicy, check_policy, perturbed_policy, run_mode
from ..threat import ThreatModel, canonical_norm
from ..schedule import total
from . import PENALTIES
from .base import CleanPass, Penalty, Requirements, Term, main_targets, split_targets
from .inner import adversarial_batch, resolve_eps


class AdversarialLoss(Penalty):
    """``L(x_adv)`` with ``x_adv`` from the shared PGD core (FGSM is PGD with one step of size ε
    and no random start). Mean over the batch; summed over the heads of a multi-task model."""

    def __init__(self, *, eps: float | str | None = None, norm: str = "linf", steps: int = 10,
                 rel_stepsize: float = 0.25, random_start: bool = True,
                 bounds: tuple[float, float] | None = None, bn_policy: BNPolicy = "eval",
                 perturbed_bn_policy: BNPolicy = "frozen") -> None:
        super().__init__(bounds=bounds)
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        self.norm = canonical_norm(norm)
        self.eps_param = eps
        self.steps = int(steps)
        self.rel_stepsize = float(rel_stepsize)
        self.random_start = bool(random_start)
        self.bn_policy = check_policy(bn_policy)
        self.perturbed_bn_policy = check_policy(perturbed_bn_policy)
        # A one-step attack without random start (FGSM-AT) reads the shared clean pass's input
        # gradient when that pass ran in the attack's mode, instead of a pass of its own.
        # L(x_adv) only: the clean term is the objective's task weight.
        self.requires = Requirements(input_grad=self.one_step(), clean_graph=False)

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(norm=self.norm, eps=resolve_eps(self.norm, self.eps_param, self.bounds),
                           bounds=self.bounds)

    def one_step(self) -> bool:
        return self.steps == 1 and not self.random_start

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The detached adversarial batch, computed under ``bn_policy``."""
        with torch.enable_grad():
            return pgd(model, x, self.threat, ce_loss(main_targets(y)), steps=self.steps,
                       rel_stepsize=self.rel_stepsize, random_start=self.random_start, generator=generator,
                       sampler=None if ctx is None else ctx.sampler, bn_policy=self.bn_policy)

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        x_adv = adversarial_batch(self, model, x, y, ctx)
        with run_mode(model, perturbed_policy(model, self.perturbed_bn_policy)):
            outputs = forward_all(model, x_adv)  # per head: (N, K_h)
        return Term(total(F.cross_entropy(out, t) for out, t in zip(outputs, split_targets(y))))


@PENALTIES.register("fgsm-at")
class FGSMAdversarialTraining(AdversarialLoss):
    """FGSM adversarial training (Goodfellow et al. 2015): α·L(x) + (1−α)·L(x + ε·sign g), α = 0.5."""

    default_lam = 0.5  # 1 − α
    task_weight = 0.5  # α

    def __init__(self, **params: Any) -> None:
        super().__init__(steps=1, rel_stepsize=1.0, random_start=False, **params)


@PENALTIES.register("pgd-at")
class PGDAdversarialTraining(AdversarialLoss):
    """PGD adversarial training (Madry et al. 2018): the loss on PGD examples only (task weight 0).

    Defaults (our choice): ℓ∞, ε = 8/255, 10 steps of 0.25·ε, random start."""

    default_lam = 1.0
    task_weight = 0.0
