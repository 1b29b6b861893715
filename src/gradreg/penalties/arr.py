"""Output-consistency penalties: ARR and TRADES (SPEC §4).

ARR: a light cross-entropy-maximizing attack (FGSM, or 1–3 PGD steps) finds ``x_adv``; the
penalty asks the outputs at ``x`` and ``x_adv`` to agree::

    L = CE(f(x), y) + λ·D(f(x), f(x_adv)),
    D ∈ { KL(p(x) ‖ p(x_adv)),  ‖f(x) − f(x_adv)‖₂² (logits),  ‖p(x) − p(x_adv)‖₂² (probabilities) }

Gradients flow through both branches; ``x_adv`` is detached. Each D is a per-sample sum over
classes averaged over the batch (``batchmean`` for KL).

TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off between
Robustness and Accuracy", ICML 2019) is the same penalty with D = KL and an inner attack that
maximizes the KL itself: start at x + 0.001·N(0, I), K = 10 sign steps of size η projected to
the ε-ball (and the bounds), model in eval mode; β = λ = 6. η is given relative to ε:
``rel_stepsize = 0.007/0.031 ≈ 0.226``, TRADES' CIFAR-10 ratio.

Composition (optax style): a penalty here is a divergence ``D`` plus an inner attack; ``arr``
pairs any D with a CE attack, ``trades`` is KL with the KL attack.

Modes (our choice, see also :mod:`gradreg.penalties.advtrain`): the inner attack runs under
``bn_policy`` (``"eval"``; for TRADES this is the paper's). The adversarial branch, whose
gradient flows into θ, runs under ``perturbed_bn_policy`` (``"frozen"``: train-mode batch
statistics, running statistics restored). TRADES' code also lets the adversarial batch update
the running statistics; ``perturbed_bn_policy="train"`` reproduces that.

.. warning::
   Departures (our choice): bounds and the default ε come from the data set (``setup``)
   unless given. With ε = 0 the penalty returns an exact 0 without running the
   attack. The attacks use the true labels. TRADES' start noise is drawn from the global RNG
   on the input's device. The clean branch is the loop's shared clean pass; a model with
   dropout therefore sees different masks in the two branches.

Example::

    pen = make("trades", eps=8 / 255)             # β = pen.default_lam = 6
    pen = make("arr", divergence="l2-logits", attack="pgd", steps=2)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..attacks.pgd_core import LossFn, ce_loss, pgd
from ..modes import BNPolicy, check_policy, perturbed_policy, run_mode
from ..threat import ThreatModel, canonical_norm
from . import PENALTIES
from .base import CleanPass, Penalty, Requirements, Term, main_targets
from .inner import adversarial_batch, clean_logits, resolve_eps

DIVERGENCES = ("kl", "l2-logits", "l2-probs")
TRADES_REL_STEPSIZE = 0.007 / 0.031  # η/ε of TRADES on CIFAR-10 ≈ 0.226


def divergence(name: str, clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Per-sample D(f(x), f(x_adv)) ``(N,)`` from logits ``(N, K)``; differentiable in both."""
    if name == "kl":
        log_p, log_q = F.log_softmax(clean, dim=1), F.log_softmax(adv, dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1)
    if name == "l2-logits":
        return (clean - adv).pow(2).sum(dim=1)
    if name == "l2-probs":
        return (F.softmax(clean, dim=1) - F.softmax(adv, dim=1)).pow(2).sum(dim=1)
    raise ValueError(f"unknown divergence {name!r}; use one of {DIVERGENCES}")


def kl_loss(clean_logits: torch.Tensor) -> LossFn:
    """Per-sample KL(p(x) ‖ p(x')) to maximize over x', with p(x) fixed (detached)."""
    log_p = F.log_softmax(clean_logits.detach(), dim=1)

    def fn(logits: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        return (log_p.exp() * (log_p - F.log_softmax(logits, dim=1))).sum(dim=1)

    return fn


class OutputConsistency(Penalty):
    """λ·mean_i D(f(xᵢ), f(x_advᵢ)) with ``x_adv`` from an inner attack maximizing ``inner``
    (``"ce"``: cross-entropy with the true label; ``"kl"``: KL(p(x) ‖ p(x')), TRADES)."""

    default_lam = 1.0  # our choice for ARR

    def __init__(self, *, divergence: str = "kl", inner: str = "ce", eps: float | str | None = None,
                 norm: str = "linf", steps: int = 1, rel_stepsize: float = 1.0, random_start: bool = False,
                 start_std: float = 0.0, bounds: tuple[float, float] | None = None,
                 bn_policy: BNPolicy = "eval", perturbed_bn_policy: BNPolicy = "frozen") -> None:
        super().__init__(bounds=bounds)
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; use one of {DIVERGENCES}")
        if inner not in ("ce", "kl"):
            raise ValueError(f"inner attack objective must be 'ce' or 'kl', got {inner!r}")
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        self.divergence = divergence
        self.inner = inner
        self.norm = canonical_norm(norm)
        self.eps_param = eps
        self.steps = int(steps)
        self.rel_stepsize = float(rel_stepsize)
        self.random_start = bool(random_start)
        self.start_std = float(start_std)
        self.bn_policy = check_policy(bn_policy)
        self.perturbed_bn_policy = check_policy(perturbed_bn_policy)
        # a one-step CE attack without random start (ARR's FGSM) reads the shared clean pass's
        # input gradient when that pass ran in the attack's mode
        self.requires = Requirements(input_grad=self.one_step())

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(norm=self.norm, eps=resolve_eps(self.norm, self.eps_param, self.bounds),
                           bounds=self.bounds)

    def one_step(self) -> bool:
        return self.inner == "ce" and self.steps == 1 and not self.random_start and self.start_std == 0

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass | None = None) -> torch.Tensor:
        """The detached ``x_adv``; the model runs under ``bn_policy`` and its modes are restored."""
        x = x.detach()
        if self.inner == "ce":
            loss_fn = ce_loss(main_targets(y))
        elif ctx is not None and (shared := ctx.logits_in(model, self.bn_policy)) is not None:
            loss_fn = kl_loss(shared)  # the shared clean pass computed p(x) already
        else:
            with torch.no_grad(), run_mode(model, self.bn_policy):
                loss_fn = kl_loss(model(x))  # p(x) in the attack's mode, as in TRADES
        start = None
        if self.start_std > 0:
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype) if ctx is None else ctx.noise_like(torch.randn, x)
            start = x + self.start_std * noise
        with torch.enable_grad():
            return pgd(model, x, self.threat, loss_fn, steps=self.steps, rel_stepsize=self.rel_stepsize,
                       random_start=self.random_start, start=start, sampler=None if ctx is None else ctx.sampler,
                       bn_policy=self.bn_policy)

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        if self.threat.eps == 0:
            return Term(x.new_zeros(()))  # x_adv = x: nothing to add, exactly
        x_adv = adversarial_batch(self, model, x, y, ctx)
        clean = clean_logits(model, x, ctx, self.perturbed_bn_policy)  # (N, K)
        with run_mode(model, perturbed_policy(model, self.perturbed_bn_policy)):
            adv = model(x_adv)  # (N, K)
        return Term(divergence(self.divergence, clean, adv).mean())


@PENALTIES.register("arr")
class ARR(OutputConsistency):
    """Output consistency D(f(x), f(x_adv)) under a light CE attack (FGSM or 1–3 PGD steps).

    ``attack="fgsm"``: one step of size ε (FGM for ℓ2). ``attack="pgd"``: ``steps`` (default 3)
    of ``rel_stepsize``·ε (default 2.5/steps, Madry's rule — our choice). ε defaults to 8/255
    for ℓ∞ and 0.5 for ℓ2 (our choice)."""

    def __init__(self, *, attack: str = "fgsm", steps: int | None = None, rel_stepsize: float | None = None,
                 random_start: bool = False, **params: Any) -> None:
        if attack == "fgsm":
            if steps not in (None, 1) or rel_stepsize not in (None, 1.0) or random_start:
                raise ValueError("attack='fgsm' is one step of size ε without random start; use attack='pgd'")
            steps, rel_stepsize = 1, 1.0
        elif attack == "pgd":
            steps = 3 if steps is None else steps
            rel_stepsize = 2.5 / steps if rel_stepsize is None else rel_stepsize
        else:
            raise ValueError(f"unknown ARR attack {attack!r}; use 'fgsm' or 'pgd'")
        if "inner" in params:
            raise TypeError("arr's inner attack maximizes the cross-entropy; use trades for the KL attack")
        super().__init__(inner="ce", steps=steps, rel_stepsize=rel_stepsize, random_start=random_start, **params)


@PENALTIES.register("trades")
class Trades(OutputConsistency):
    """TRADES (Zhang et al. 2019): β·KL(p(x) ‖ p(x_adv)), x_adv maximizing that KL; β = 6.

    Defaults: ℓ∞ ε = 8/255, K = 10 steps of η = (0.007/0.031)·ε, start x + 0.001·N(0, I)."""

    default_lam = 6.0  # β of TRADES

    def __init__(self, *, steps: int = 10, rel_stepsize: float = TRADES_REL_STEPSIZE, start_std: float = 0.001,
                 **params: Any) -> None:
        for fixed in ("divergence", "inner", "random_start"):
            if fixed in params:
                raise TypeError(f"trades fixes {fixed} (KL with the KL attack from x + start noise)")
        super().__init__(divergence="kl", inner="kl", steps=steps, rel_stepsize=rel_stepsize, random_start=False,
                         start_std=start_std, **params)
