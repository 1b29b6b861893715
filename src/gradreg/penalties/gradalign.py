"""GradAlign: FGSM training with a gradient-alignment regularizer (SPEC §7).

Andriushchenko, Flammarion, "Understanding and Improving Fast Adversarial Training",
NeurIPS 2020 (arXiv 2007.02617)::

    ℓ(x + δ_FGSM) + λ·(1 − cos(∇ₓℓ(x), ∇ₓℓ(x + η))),   η ~ U(−ε, ε)^d,
    δ_FGSM = ε·sign ∇ₓℓ(x)  (FGSM from zero, the paper's ``--attack_init=zero``)

Both gradients are differentiated (double backprop): the clean one is the shared clean pass's
graph-keeping input gradient (``ctx.input_grad()``) when the reuse rule allows it, and the
FGSM step reads the same pass's detached gradient, so a GradAlign step costs the clean pass,
one double-backprop pass at x + η and one forward-backward pass at x + δ_FGSM.

The cosine is per sample; as in the authors' code, samples whose clean or noisy gradient is
exactly zero are left out of the mean (the cosine is undefined there), and the regularizer is 0
when every sample's is.

**λ indexed by ε.** The authors' CIFAR-10 runs (their experiment script in
tml-epfl/understanding-fast-adv-training: ε = 1…16/255 with λ = 0.027, 0.036, 0.047, 0.063,
0.084, 0.112, 0.150, 0.200, 0.267, 0.356, 0.474, 0.632, 0.843, 1.124, 1.500, 2.000) follow their
"log-linear interpolation scheme" λ = exp(ε₂₅₅·ln(10)/8 + ln 0.02) = 0.02·10^(ε₂₅₅/8), ε₂₅₅ = ε
in units of 1/255 of the input box; SPEC §7 anchors 0.2 at 8/255 and 2.0 at ≥ 16/255.
``align_lam=None`` uses that rule, capped at 2.0 above 16/255 (our choice: the paper tunes no
larger ε, and the rule would give 0.02·10^9.6 at MNIST's ε = 0.3). Pass ``align_lam`` for
other data sets.

Our choices: x + η is clipped to the input bounds (SPEC §7's ball is the clipped one; the
authors' code does not clip); ℓ is the main head's cross-entropy, the adversarial loss its
batch mean; the FGSM attack runs under ``bn_policy="eval"``, the passes whose gradient flows
into θ (x + δ_FGSM, and x + η with the clean gradient) under ``perturbed_bn_policy="frozen"``
(the paper trains everything in train mode). Task weight 0 and λ = 1: the term is the whole
objective; ``--add`` composes it with others.

Example::

    pen = make("gradalign", eps=8 / 255)             # λ_align = 0.2
    loss = pen(model, x, y)
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..attacks.pgd_core import ce_loss, pgd
from ..modes import BNPolicy, check_policy, perturbed_policy, run_mode
from ..threat import ThreatModel
from . import PENALTIES
from .base import CleanPass, Penalty, Requirements, Term, main_targets
from .inner import adversarial_batch, resolve_eps
from .norms import safe_l2
from .passes import clean_loss_and_grad, loss_and_grad_at, main_logits, per_sample_dot, uniform_like


def paper_align_lam(eps: float, bounds: tuple[float, float]) -> float:
    """The authors' λ for ε: 0.02·10^(ε₂₅₅/8), capped at 2.0 (see the module doc)."""
    eps_255 = 255.0 * eps / (float(bounds[1]) - float(bounds[0]))
    return min(2.0, math.exp(eps_255 * math.log(10) / 8 + math.log(0.02)))


def masked_cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cos(aᵢ, bᵢ) ``(N,)`` and the mask ``(N,)`` of rows where both are nonzero; the
    cosine is 0 (with zero gradient, no NaN) on the other rows."""
    na, nb = safe_l2(a), safe_l2(b)  # (N,)
    ok = (na > 0) & (nb > 0)
    denom = torch.where(ok, na * nb, torch.ones_like(na))
    return torch.where(ok, per_sample_dot(a, b) / denom, torch.zeros_like(na)), ok


@PENALTIES.register("gradalign")
class GradAlign(Penalty):
    """GradAlign (Andriushchenko & Flammarion 2020): ℓ(x + δ_FGSM) + λ·(1 − cos(∇ℓ(x), ∇ℓ(x + η)))."""

    default_lam = 1.0
    task_weight = 0.0  # the term is the whole objective (FGSM loss + alignment)
    requires = Requirements(input_grad=True, double_backward=True, clean_graph=True)

    def __init__(self, *, eps: float | str | None = None, align_lam: float | None = None,
                 bounds: tuple[float, float] | None = None, bn_policy: BNPolicy = "eval",
                 perturbed_bn_policy: BNPolicy = "frozen") -> None:
        super().__init__(bounds=bounds)
        if align_lam is not None and align_lam < 0:
            raise ValueError(f"gradalign align_lam must be ≥ 0, got {align_lam!r}")
        self.eps_param = eps
        self.align_lam_param = None if align_lam is None else float(align_lam)
        self.bn_policy = check_policy(bn_policy)
        self.perturbed_bn_policy = check_policy(perturbed_bn_policy)
        self.rel_stepsize = 1.0  # FGSM: one step of ε from x (read by adversarial_batch)

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(norm="linf", eps=resolve_eps("linf", self.eps_param, self.bounds), bounds=self.bounds)

    @property
    def align_lam(self) -> float:
        if self.align_lam_param is not None:
            return self.align_lam_param
        return paper_align_lam(self.threat.eps, self.bounds)

    def one_step(self) -> bool:
        return True

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> torch.Tensor:
        """FGSM from x (zero start), under ``bn_policy``, detached."""
        with torch.enable_grad():
            return pgd(model, x, self.threat, ce_loss(main_targets(y)), steps=1, rel_stepsize=1.0,
                       random_start=False, bn_policy=self.bn_policy)

    def alignment(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> torch.Tensor:
        """1 − mean cos(∇ℓ(x), ∇ℓ(x + η)) over the rows where both are nonzero (0 if none)."""
        policy = perturbed_policy(model, self.perturbed_bn_policy)
        _, g_clean = clean_loss_and_grad(model, x, y, ctx, policy=policy, create_graph=True)  # (N, ...)
        threat = self.threat
        x_noisy = threat.clip(x.detach() + uniform_like(ctx, x, threat.eps))  # η ~ U(−ε, ε)
        _, g_noisy = loss_and_grad_at(model, x_noisy, y, policy=policy, create_graph=True, fast=ctx.fast)  # (N, ...)
        cos, ok = masked_cosine(g_clean, g_noisy)
        count = ok.sum()
        return torch.where(count > 0, (ok.to(cos.dtype) - cos).sum() / count.clamp_min(1), cos.sum() * 0)

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        lam = self.align_lam
        # the alignment first: its graph-keeping clean gradient is then the one the FGSM step reads
        align = self.alignment(model, x, y, ctx) if lam != 0 else None
        x_adv = adversarial_batch(self, model, x, y, ctx)
        with run_mode(model, perturbed_policy(model, self.perturbed_bn_policy)):
            adv = F.cross_entropy(main_logits(model, x_adv), main_targets(y))
        return Term(adv if align is None else adv + lam * align)
