"""Adversarial training as a term of the one objective: FGSM-AT and PGD-AT (SPEC §6).

Both train on a mixture of clean and adversarial examples with the adversarial weight
α = ``adv_weight``::

    J(θ) = (1 − α)·L(x) + α·L(x_adv)

- Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
  Adversarial Attacks", ICLR 2018: ``pgd-at``'s default, α = 1 (PGD examples only), x_adv =
  PGD_ε(x) with a random start in the ε-ball and K projected steepest-ascent steps on the
  true label.
- Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015:
  ``fgsm-at``'s default, α = 0.5, x_adv = x + ε·sign ∇ₓL(x).
- Roth, Lucchi, Nowozin, Hofmann, "Adversarially Robust Training through Structured Gradient
  Regularization", arXiv 1805.08736: its FGSM and PGD baselines train on a mixture of clean and
  adversarial examples and attack the model's *predicted* label (no label leaking, Kurakin
  et al. 2017). Our reading of those rows (the paper gives no weight): ``adv_weight=0.5,
  labels="predicted"`` (the Goodfellow/Kurakin mixture).

``labels`` picks what the attack ascends: ``"true"`` (default) the cross-entropy with y,
``"predicted"`` the cross-entropy with the argmax of the model's clean logits in the attack's
mode (:func:`.inner.attack_labels`). The loss on x_adv always uses the true labels.

As a term of gradreg's objective ``task_weight·L(x) + λ·penalty`` (task weight 0, λ = 1 by
default) the penalty *is* the mixture: its :class:`~.base.Term` has the value
``(1 − α)·L(x) + α·L(x_adv)`` and hands the clean gradient (1 − α)·∇θL(x) to the step as
``clean_coeff = 1 − α`` (declared in its ``requires``), so the shared clean pass serves it and
a one-step attack can be fused. ``λ`` scales the whole mixture; ``--task-weight`` adds clean
loss on top. ``L`` is the task loss, i.e. the sum of cross-entropies over all heads of a
multi-task model (our choice); the attack maximizes the main head's cross-entropy.

Modes and BatchNorm (our choice; the papers train BatchNorm on the adversarial batches):

- the attack runs under ``bn_policy`` (``"eval"`` by default): running statistics are used and
  never updated, dropout is off;
- the loss on ``x_adv`` (whose gradient flows into θ) runs under ``perturbed_bn_policy``
  (``"frozen"`` by default): train mode with the adversarial batch's statistics, but its
  running statistics are restored, so only the loop's clean pass updates them. Pass
  ``perturbed_bn_policy="train"`` for Madry's behaviour. A model in eval mode (evaluating the
  penalty, not training) stays in eval mode.

Example::

    pen = make("pgd-at", eps=8 / 255, steps=10, rel_stepsize=0.25)               # Madry
    pen = make("pgd-at", eps=8 / 255, adv_weight=0.5, labels="predicted")        # the SGR paper's row
    objective = Objective([("pgd-at", pen, pen.default_lam)], task_weight=pen.task_weight)

ε ramp (``eps_ramp_steps`` = R > 0; our choice, off by default): the attack's radius grows
linearly, ε_t = ε·min(1, (t + 1)/R) at training step t, the warm-up that large-radius MNIST
training commonly uses (e.g. Gowal et al. 2018's interval-bound training ramps ε; Madry et al.
train at the full ε from the start). The clock is a buffer of the term, so a resumed or 2-rank
run ramps alike, and it advances only while the model trains; ``threat`` stays the full ε (the
monitor and the reports read it), ``step_threat()`` is the ramped one.

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
from ..cleanpass import main_targets, total
from . import PENALTIES
from .base import CleanPass, Penalty, Requirements, Term, split_targets
from .inner import adversarial_batch, attack_labels, check_labels, resolve_eps


class AdversarialLoss(Penalty):
    """``(1 − α)·L(x) + α·L(x_adv)`` with ``x_adv`` from the shared PGD core (FGSM is PGD with
    one step of size ε and no random start). Mean over the batch; summed over the heads of a
    multi-task model."""

    default_adv_weight = 1.0
    step: torch.Tensor  # training steps taken (the ε ramp's clock; registered only with a ramp)

    def __init__(self, *, eps: float | str | None = None, norm: str = "linf", steps: int = 10,
                 rel_stepsize: float = 0.25, random_start: bool = True,
                 bounds: tuple[float, float] | None = None, bn_policy: BNPolicy = "eval",
                 perturbed_bn_policy: BNPolicy = "frozen", adv_weight: float | None = None,
                 labels: str = "true", eps_ramp_steps: int = 0) -> None:
        super().__init__(bounds=bounds)
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        if eps_ramp_steps < 0 or int(eps_ramp_steps) != eps_ramp_steps:
            raise ValueError(f"eps_ramp_steps must be a whole number ≥ 0, got {eps_ramp_steps!r}")
        adv_weight = self.default_adv_weight if adv_weight is None else float(adv_weight)
        if not 0 <= adv_weight <= 1:
            raise ValueError(f"adv_weight must be in [0, 1], got {adv_weight!r}")
        self.adv_weight = adv_weight
        self.labels = check_labels(labels)
        self.norm = canonical_norm(norm)
        self.eps_param = eps
        self.steps = int(steps)
        self.rel_stepsize = float(rel_stepsize)
        self.random_start = bool(random_start)
        self.bn_policy = check_policy(bn_policy)
        self.perturbed_bn_policy = check_policy(perturbed_bn_policy)
        self.eps_ramp_steps = int(eps_ramp_steps)
        if self.eps_ramp_steps:  # the ramp's clock; only a ramped term has it, so other state dicts are unchanged
            self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # A one-step attack without random start on the true label (FGSM-AT) reads the shared
        # clean pass's input gradient when that pass ran in the attack's mode, instead of a pass
        # of its own. The clean part of the mixture is handed to the step as clean_coeff.
        self.requires = Requirements(input_grad=self.one_step(), clean_graph=False, clean_coeff=1.0 - adv_weight)

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(norm=self.norm, eps=resolve_eps(self.norm, self.eps_param, self.bounds),
                           bounds=self.bounds)

    def ramp_factor(self) -> float:
        """ε_t / ε at this training step: ``min(1, (t + 1) / eps_ramp_steps)``, 1 without a ramp."""
        if not self.eps_ramp_steps:
            return 1.0
        return min(1.0, (int(self.step) + 1) / self.eps_ramp_steps)

    def step_threat(self) -> ThreatModel:
        """The threat the attack uses at this step: :attr:`threat` with ε scaled by the ramp.
        :attr:`threat` itself stays the target radius (the monitor and reports read it)."""
        threat, factor = self.threat, self.ramp_factor()
        return threat if factor == 1.0 else ThreatModel(norm=threat.norm, eps=threat.eps * factor, bounds=threat.bounds)

    def one_step(self) -> bool:
        """Whether x_adv is one ascent step from x on the true label, i.e. readable off the
        shared clean pass's input gradient (which is of the true label's loss)."""
        return self.steps == 1 and not self.random_start and self.labels == "true"

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The detached adversarial batch, computed under ``bn_policy``, ascending the loss of the
        true or the predicted labels (``labels``)."""
        if ctx is None and self.labels == "predicted":
            ctx = CleanPass.standalone(model, x, y, need_input_grad=False)
        target = (main_targets(y) if ctx is None else
                  attack_labels(model, x, y, ctx, labels=self.labels, bn_policy=self.bn_policy))  # (N,)
        with torch.enable_grad():
            return pgd(model, x, self.step_threat(), ce_loss(target), steps=self.steps,
                       rel_stepsize=self.rel_stepsize, random_start=self.random_start, generator=generator,
                       sampler=None if ctx is None else ctx.sampler, bn_policy=self.bn_policy)

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        x_adv = adversarial_batch(self, model, x, y, ctx, threat=self.step_threat())
        if self.eps_ramp_steps and model.training:  # the ramp advances only while the model trains
            self.step += 1
        with run_mode(model, perturbed_policy(model, self.perturbed_bn_policy)):
            outputs = forward_all(model, x_adv)  # per head: (N, K_h)
        adv = total(F.cross_entropy(out, t) for out, t in zip(outputs, split_targets(y)))
        clean_w = 1.0 - self.adv_weight
        if clean_w == 0:
            return Term(adv)
        # The value carries the mixture's number; the main head's clean gradient is clean_coeff's
        # (the step adds it from the shared pass); auxiliary heads' clean losses are added here
        # (multi-task steps are never fused, so the shared clean graph is kept for them).
        clean = ctx.losses()  # per head, mean CE on the clean pass
        aux = total(clean[1:]) if len(clean) > 1 else adv.new_zeros(())
        return Term(self.adv_weight * adv + clean_w * (clean[0].detach() + aux))


@PENALTIES.register("fgsm-at")
class FGSMAdversarialTraining(AdversarialLoss):
    """FGSM adversarial training (Goodfellow et al. 2015): (1−α)·L(x) + α·L(x + ε·sign g), α =
    ``adv_weight`` = 0.5 by default; ``labels="predicted"`` for the SGR paper's row."""

    default_lam = 1.0
    task_weight = 0.0  # the clean part of the mixture is in the term
    default_adv_weight = 0.5

    def __init__(self, **params: Any) -> None:
        super().__init__(steps=1, rel_stepsize=1.0, random_start=False, **params)


@PENALTIES.register("pgd-at")
class PGDAdversarialTraining(AdversarialLoss):
    """PGD adversarial training (Madry et al. 2018): the loss on PGD examples only (``adv_weight``
    1, task weight 0); ``adv_weight=0.5, labels="predicted"`` for the SGR paper's row.

    Defaults (our choice): ℓ∞, ε = 8/255, 10 steps of 0.25·ε, random start."""

    default_lam = 1.0
    task_weight = 0.0
