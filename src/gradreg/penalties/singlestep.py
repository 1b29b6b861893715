"""Single-step adversarial training from a random start: FGSM-RS and N-FGSM (SPEC §7).

Both are adversarial training with one signed-gradient step, as terms of the one objective
(task weight 0, λ = 1): the term is the loss on the single-step example alone (``adv_weight``
1, as both papers train), built on :class:`~.advtrain.AdversarialLoss` — its mixture, BatchNorm
policies, label choice and multi-head sum — so only the attack differs:

- **FGSM-RS** — Wong, Rice, Kolter, "Fast is better than free: Revisiting adversarial
  training", ICLR 2020::

      δ₀ ~ U(−ε, ε),   δ = Π_{B_ε}(δ₀ + α·sign ∇ₓℓ(x + δ₀)),   α = 1.25·ε,   train on x + δ

  This is the shared PGD core with one step of 1.25·ε from a uniform random start (the start
  and the step are clipped to the input bounds, then projected onto the ε-ball), so
  ``fgsm-rs`` is ``AdversarialLoss(steps=1, rel_stepsize=1.25, random_start=True)``.
- **N-FGSM** — de Jorge, Bibi, Volpi, Sanyal, Torr, Rogez, Dokania, "Make Some Noise:
  Reliable and Efficient Single-Step Adversarial Training", NeurIPS 2022::

      η ~ U(−kε, kε),  k = 2,   δ = η + α·sign ∇ₓℓ(x + η),   α = ε,   train on clip(x + δ)

  with **no** projection onto the ε-ball: ‖δ‖∞ ≤ (k + 1)·ε. Only ℓ∞ (the paper's threat).

Our choices (the papers leave them open or train otherwise):

- the random draws come from the training loop's rank-independent batch noise, so a 2-rank
  run and a resumed run draw what the 1-rank uninterrupted run draws;
- N-FGSM clips the noisy point x + η to the input bounds before taking the gradient (the
  gradient is then taken at a valid input) and clips x + δ again after the step;
- the attack runs under ``bn_policy="eval"`` and the loss on the example under
  ``perturbed_bn_policy="frozen"`` (running statistics never see perturbed inputs), as for
  FGSM-AT and PGD-AT; Wong et al. and de Jorge et al. run both in train mode
  (``bn_policy="train", perturbed_bn_policy="train"`` reproduces that).

Neither reads the shared clean pass's input gradient: the step is taken at a random point, not
at x. Example::

    pen = make("n-fgsm", eps=8 / 255)            # k = 2, α = ε
    pen = make("fgsm-rs", eps=0.3)               # α = 1.25ε
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..attacks.pgd_core import ce_loss, input_gradient
from ..modes import run_mode
from . import PENALTIES
from .advtrain import AdversarialLoss
from .base import CleanPass, main_targets
from .inner import attack_labels


@PENALTIES.register("fgsm-rs")
class FGSMRandomStart(AdversarialLoss):
    """FGSM-RS (Wong, Rice, Kolter 2020): the loss at Π_ε(x + δ₀ + 1.25ε·sign ∇ℓ(x + δ₀)), δ₀ ~ U(−ε, ε)."""

    default_lam = 1.0
    task_weight = 0.0
    default_adv_weight = 1.0

    def __init__(self, *, rel_stepsize: float = 1.25, **params: Any) -> None:
        super().__init__(steps=1, rel_stepsize=rel_stepsize, random_start=True, **params)


@PENALTIES.register("n-fgsm")
class NoiseFGSM(AdversarialLoss):
    """N-FGSM (de Jorge et al. 2022): the loss at clip(x + η + ε·sign ∇ℓ(x + η)), η ~ U(−2ε, 2ε), no projection."""

    default_lam = 1.0
    task_weight = 0.0
    default_adv_weight = 1.0

    def __init__(self, *, noise_mult: float = 2.0, rel_stepsize: float = 1.0, **params: Any) -> None:
        super().__init__(steps=1, rel_stepsize=rel_stepsize, random_start=True, **params)
        if self.norm != "linf":
            raise ValueError(f"n-fgsm is defined for the ℓ∞ threat model, got norm={self.norm!r}")
        if noise_mult < 0:
            raise ValueError(f"n-fgsm noise_mult (k) must be ≥ 0, got {noise_mult!r}")
        self.noise_mult = float(noise_mult)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """x + δ (detached, clipped to the bounds, not projected onto the ε-ball)."""
        threat = self.threat
        if ctx is None and self.labels == "predicted":
            ctx = CleanPass.standalone(model, x, y, need_input_grad=False)
        target = (main_targets(y) if ctx is None else
                  attack_labels(model, x, y, ctx, labels=self.labels, bn_policy=self.bn_policy))  # (N,)
        x = x.detach()
        if ctx is None or generator is not None:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        else:
            noise = ctx.noise_like(torch.rand, x)
        x_noisy = threat.clip(x + (2 * noise - 1) * (self.noise_mult * threat.eps))  # η ~ U(−kε, kε)
        with run_mode(model, self.bn_policy):
            g = input_gradient(model, x_noisy, ce_loss(target))  # (N, ...)
        return threat.clip(x_noisy + self.rel_stepsize * threat.eps * g.sign()).detach()


__all__ = ["FGSMRandomStart", "NoiseFGSM"]
