"""Local-linearity regularizers: LLR, ELLE and ELLE-A (SPEC §7).

- **LLR** — Qin, Martens, Gowal, Krishnan, Dvijotham, Fawzi, De, Stanforth, Kohli, "Adversarial
  Robustness through Local Linearization", NeurIPS 2019 (arXiv 1907.02610)::

      g(δ; x) = |ℓ(x + δ) − ℓ(x) − δᵀ∇ₓℓ(x)|,   γ(ε, x) = max_{δ ∈ B_ε} g(δ; x),
      L = ℓ(x) + λ·γ(ε, x) + μ·|δ_LLRᵀ ∇ₓℓ(x)|,   δ_LLR = argmax of γ

  γ is maximized by a few steps of the shared PGD core (random start, ℓ∞ sign steps, projected)
  on g with ℓ(x) and ∇ₓℓ(x) held fixed; the outer terms are then differentiated in θ at δ_LLR,
  ∇ₓℓ(x) included (double backprop), and averaged over the batch.
- **ELLE** — Abad Rocamora, Liu, Chrysos, Olmos, Cevher, "Efficient local linearity
  regularization to overcome catastrophic overfitting", ICLR 2024::

      E(x) = (ℓ(x_c) − α·ℓ(x_a) − (1 − α)·ℓ(x_b))²,   x_a, x_b ~ U(B_ε(x)),  α ~ U(0, 1),
      x_c = α·x_a + (1 − α)·x_b

  the error of the linear interpolation of the loss between two random points of the ball,
  averaged over the batch: no input gradient, no double backprop (three forward passes, one
  of them batched). The paper adds λ·E to single-step AT; here ELLE is a term that composes
  (``--method fgsm-rs --add elle``); alone it is added to the clean loss (task weight 1).
- **ELLE-A** — the same paper's adaptive λ: λ is raised to ``lam_max`` whenever the batch's E
  exceeds the mean plus 2 standard deviations of all earlier batches' E, and decays by
  ``decay`` = 0.99 per step otherwise (SPEC §7). The term's value is λ_t·E (the objective's λ
  multiplies it, 1 by default).
  λ_t follows the linearity error E itself, the paper's own catastrophic-overfitting signal
  (the paper's rule). The training loop's monitor (:mod:`gradreg.monitor`: FGSM/PGD accuracy
  on a held-out batch) hands its reading to every term through ``on_monitor``. By default
  ELLE-A leaves λ_t to the paper's rule (our choice: a run with or without the monitor then
  trains the same weights); with ``monitor_jump = true`` a check that the monitor flags as
  catastrophic overfitting also raises λ_t to ``lam_max``, as a jump of E would (our
  extension: the same reaction to the monitor's signal).

Our choices (the papers leave them open or we could not check their numbers):

- LLR's defaults λ = 4 (``gamma_weight``), μ = 3 (``grad_weight``), ``steps`` = 3 of 0.25·ε
  after a random start; ELLE's λ = 5000 and ELLE-A's ``lam_max`` = 5000 — orders of magnitude
  for E ≈ 10⁻⁴, not values checked against the papers' tables;
- ELLE-A starts at λ = ``lam_max`` (no statistics yet to say the error is normal; the paper's
  first steps are not specified here) and never decays below ``lam_min`` (0); a batch is
  compared with the *earlier* batches only (mean and variance over all of them, kept exactly
  by Welford's update in float64 buffers, so a checkpoint resumes the rule bitwise), and at
  least ``warmup`` = 2 earlier batches are needed before the jump can fire; the λ it sets is
  used for the batch that set it. Under torch.distributed the rule reads the global batch's
  mean E (the ranks' means weighted by shard size, through ``ctx.ranks``), so every rank
  takes the same decision. The state advances only while the model trains;
- x_a, x_b are clipped to the input bounds (x_c, a convex combination, then is too); the
  random draws come from the loop's rank-independent batch noise;
- ℓ is the main head's cross-entropy; gradients are per sample (of Σᵢ ℓᵢ); LLR's inner
  maximization runs under ``bn_policy="eval"``, every pass whose gradient flows into θ under
  ``perturbed_bn_policy="frozen"``; ELLE's three points go through the model as one batch of
  3N (with BatchNorm in train mode they share batch statistics).

Example::

    pen = make("llr", eps=8 / 255, steps=2)
    pen = make("elle-a", eps=8 / 255)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..attacks.pgd_core import pgd
from ..modes import BNPolicy, check_policy, perturbed_policy, run_mode
from ..threat import ThreatModel
from . import PENALTIES
from .base import CleanPass, Penalty, Requirements, Term, main_targets
from .inner import resolve_eps
from .passes import clean_loss_and_grad, main_logits, per_sample_dot, uniform_like


@PENALTIES.register("llr")
class LLR(Penalty):
    """LLR (Qin et al. 2019): λ·max_{δ∈B_ε}|ℓ(x+δ) − ℓ(x) − δᵀ∇ℓ(x)| + μ·|δᵀ∇ℓ(x)| at the maximizer."""

    default_lam = 1.0
    requires = Requirements(input_grad=True, double_backward=True, clean_graph=True)

    def __init__(self, *, eps: float | str | None = None, gamma_weight: float = 4.0, grad_weight: float = 3.0,
                 steps: int = 3, rel_stepsize: float = 0.25, bounds: tuple[float, float] | None = None,
                 bn_policy: BNPolicy = "eval", perturbed_bn_policy: BNPolicy = "frozen") -> None:
        super().__init__(bounds=bounds)
        if steps < 1:
            raise ValueError(f"llr steps must be ≥ 1, got {steps}")
        self.eps_param = eps
        self.gamma_weight = float(gamma_weight)
        self.grad_weight = float(grad_weight)
        self.steps = int(steps)
        self.rel_stepsize = float(rel_stepsize)
        self.bn_policy = check_policy(bn_policy)
        self.perturbed_bn_policy = check_policy(perturbed_bn_policy)

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(norm="linf", eps=resolve_eps("linf", self.eps_param, self.bounds), bounds=self.bounds)

    def maximizer(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> torch.Tensor:
        """δ_LLR ``(N, ...)``, detached: PGD on g(δ; x) with ℓ(x) and ∇ℓ(x) fixed, under ``bn_policy``."""
        loss0, g0 = clean_loss_and_grad(model, x, y, ctx, policy=self.bn_policy, create_graph=False)
        x0, target = x.detach(), main_targets(y)

        def gap(logits: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:  # (N,)
            lin = loss0 + per_sample_dot(x_adv - x0, g0)
            return (F.cross_entropy(logits, target, reduction="none") - lin).abs()

        with torch.enable_grad():
            x_adv = pgd(model, x0, self.threat, gap, steps=self.steps, rel_stepsize=self.rel_stepsize,
                        random_start=True, sampler=ctx.sampler, bn_policy=self.bn_policy)
        return x_adv - x0

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        policy = perturbed_policy(model, self.perturbed_bn_policy)
        # the graph-keeping clean gradient first: the inner maximization then reads it detached
        # from the shared pass (when that pass may stand in for its mode) instead of another backward
        loss0, g = clean_loss_and_grad(model, x, y, ctx, policy=policy, create_graph=True)  # (N,), (N, ...)
        delta = self.maximizer(model, x, y, ctx)
        with run_mode(model, policy):
            loss_d = F.cross_entropy(main_logits(model, x.detach() + delta), main_targets(y), reduction="none")
        first_order = per_sample_dot(delta, g)  # δᵀ∇ℓ(x), (N,)
        gamma = (loss_d - loss0 - first_order).abs()
        return Term((self.gamma_weight * gamma + self.grad_weight * first_order.abs()).mean())


def interpolation_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass, *,
                        threat: ThreatModel, policy: BNPolicy) -> torch.Tensor:
    """ELLE's E(x) per sample ``(N,)``: three points of the ball from the batch noise (x_a, x_b,
    then α), one pass over the 3N points under ``policy``."""
    x0 = x.detach()
    x_a = threat.clip(x0 + uniform_like(ctx, x0, threat.eps))
    x_b = threat.clip(x0 + uniform_like(ctx, x0, threat.eps))
    alpha = ctx.noise_like(torch.rand, x0.new_empty(len(x0)))  # (N,)
    a = alpha.view(-1, *([1] * (x0.dim() - 1)))
    x_c = a * x_a + (1 - a) * x_b
    target = main_targets(y)
    with run_mode(model, policy):
        logits = main_logits(model, torch.cat([x_a, x_b, x_c]))  # (3N, K)
    losses = F.cross_entropy(logits, target.repeat(3), reduction="none").view(3, -1)  # (3, N)
    return (losses[2] - alpha * losses[0] - (1 - alpha) * losses[1]).pow(2)


@PENALTIES.register("elle")
class ELLE(Penalty):
    """ELLE (Abad Rocamora et al. 2024): E[(ℓ(x_c) − αℓ(x_a) − (1−α)ℓ(x_b))²], random x_a, x_b in the ε-ball."""

    default_lam = 5000.0
    requires = Requirements(input_grad=False, clean_graph=False)

    def __init__(self, *, eps: float | str | None = None, bounds: tuple[float, float] | None = None,
                 perturbed_bn_policy: BNPolicy = "frozen") -> None:
        super().__init__(bounds=bounds)
        self.eps_param = eps
        self.perturbed_bn_policy = check_policy(perturbed_bn_policy)

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(norm="linf", eps=resolve_eps("linf", self.eps_param, self.bounds), bounds=self.bounds)

    def error(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> torch.Tensor:
        """The batch mean of E, differentiable in θ."""
        return interpolation_error(model, x, y, ctx, threat=self.threat,
                                   policy=perturbed_policy(model, self.perturbed_bn_policy)).mean()

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        return Term(self.error(model, x, y, ctx))


@PENALTIES.register("elle-a")
class AdaptiveELLE(ELLE):
    """ELLE-A (Abad Rocamora et al. 2024): λ_t·E, λ_t jumps to lam_max when E > mean + 2 std of earlier E, ×0.99 otherwise."""

    default_lam = 1.0  # the adaptive λ_t is inside the term
    lam_now: torch.Tensor
    count: torch.Tensor
    err_mean: torch.Tensor
    err_m2: torch.Tensor

    def __init__(self, *, lam_max: float = 5000.0, lam_min: float = 0.0, decay: float = 0.99, warmup: int = 2,
                 monitor_jump: bool = False, **params: object) -> None:
        super().__init__(**params)  # type: ignore[arg-type]
        if not 0 < decay <= 1:
            raise ValueError(f"elle-a decay must be in (0, 1], got {decay!r}")
        if not 0 <= lam_min <= lam_max:
            raise ValueError(f"elle-a needs 0 ≤ lam_min ≤ lam_max, got {lam_min!r}, {lam_max!r}")
        self.lam_max = float(lam_max)
        self.lam_min = float(lam_min)
        self.decay = float(decay)
        self.warmup = int(warmup)
        self.monitor_jump = bool(monitor_jump)
        # λ_t and Welford's running count, mean and sum of squared deviations of the earlier E
        self.register_buffer("lam_now", torch.tensor(self.lam_max, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("err_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("err_m2", torch.zeros((), dtype=torch.float64))

    def update(self, err: float) -> float:
        """Advance the rule by one batch with mean error ``err``; returns λ for this batch."""
        n = int(self.count)
        mean = float(self.err_mean)
        std = (float(self.err_m2) / (n - 1)) ** 0.5 if n > 1 else 0.0
        if n >= self.warmup and err > mean + 2 * std:
            lam = self.lam_max
        else:
            lam = max(self.lam_min, float(self.lam_now) * self.decay)
        self.lam_now.fill_(lam)
        # Welford's update with this batch's error
        self.count += 1
        d = err - mean
        new_mean = mean + d / (n + 1)
        self.err_mean.fill_(new_mean)
        self.err_m2.fill_(float(self.err_m2) + d * (err - new_mean))
        return lam

    def on_monitor(self, *, fgsm_accuracy: float, pgd_accuracy: float, overfit: bool, step: int) -> None:
        """The monitor's check (the same reading on every rank): with ``monitor_jump``, a flagged
        check raises λ_t to ``lam_max``; the rule then decays it as after a jump of E."""
        if self.monitor_jump and overfit:
            self.lam_now.fill_(self.lam_max)

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        err = self.error(model, x, y, ctx)
        if not model.training:
            return Term(float(self.lam_now) * err)
        # the global batch's mean E: every rank takes the same decision
        (global_err,) = ctx.ranks.average([err.detach().reshape(1)], len(x))
        lam = self.update(float(global_err))
        return Term(lam * err)
