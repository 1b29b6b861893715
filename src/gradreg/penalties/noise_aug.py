"""Training on inputs with long-range-correlated (LRC) noise added: the "LRC-augmented" row of
the SGR paper's LRC experiment (SPEC §3).

Roth, Lucchi, Nowozin, Hofmann, "Adversarially Robust Training through Structured Gradient
Regularization", arXiv 1805.08736 (2018), compare SGR and GN with a model trained on inputs
corrupted by the noise of their LRC attack (:mod:`gradreg.attacks.lrc`)::

    J(θ) = E[ L(clip(x + ε·s·ξ)) ],   ξ ~ N(0, Σ_LRC(ζ)),  [Σ_LRC]_{(c,p),(c',q)} = κ_cc'·exp(−‖p − q‖₂/ζ)

From the paper: training on x plus LRC noise, the noise model Σ_LRC (κ = 1 within a channel,
0.5 between channels) and its decay lengths ζ ∈ {1, 2, 4, 8, 16}. The paper does not say how
it drew ζ, ε or weighted the clean loss, so the rest is **our choice**:

- ζ is drawn per *example* (uniformly from ``zetas``; one value fixes it): per-example draws
  from the loop's rank-independent random numbers (``CleanPass.noise_like``) are the same
  for any number of ranks, and a batch then mixes decay lengths;
- ε is fixed (a noise strength, the marginal standard deviation of the noise, not a radius),
  scaled by s = ``scale``: ``"data"`` — the square root of the training inputs' mean per-pixel
  variance, set by ``setup(train_x)`` (the same data standardization as the LRC attack's
  ``marginal_std`` in the lrc-cifar10 experiment; our reading of the paper's "data covariance
  as Σ_LRC"), ``"unit"`` (s = 1, the LRC attack's default), or a number;
- the noisy inputs are clipped to ``bounds`` (the data set's, from ``setup``, unless given), as the attack does;
- the method replaces the clean loss (``task_weight = 0``, ``default_lam = 1``: plain data
  augmentation, every input seen only with noise; pass ``task_weight`` for a mix, as FGSM-AT);
- the loss is the objective's task loss (the sum of cross-entropies over all heads);
- modes and BatchNorm as the adversarial-training penalties (:mod:`.advtrain`): the noisy
  pass runs under ``perturbed_bn_policy`` (``"frozen"``: batch statistics, running statistics
  untouched, so only the loop's clean pass updates them); a model in eval mode stays in eval.

Example::

    pen = make("lrc-aug", eps=0.3, zetas=[1, 2, 4, 8, 16], scale="data")
    pen.setup(model, train_x, bounds=(0.0, 1.0))
    objective = Objective([("lrc-aug", pen, pen.default_lam)], task_weight=pen.task_weight)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..attacks.lrc import lrc_transform, mean_marginal_variance
from ..models.base import forward_all
from ..modes import BNPolicy, check_policy, perturbed_policy, run_mode
from ..cleanpass import total
from . import PENALTIES
from .base import CleanPass, Penalty, Requirements, Term, split_targets

SCALES = ("data", "unit")


@PENALTIES.register("lrc-aug")
class LRCAugmentation(Penalty):
    """Training on x + LRC noise (SGR paper's LRC-augmented model): ε = 0.3, ζ per example from {1, 2, 4, 8, 16}.

    ``L(clip(x + ε·s·ξ))`` with ξ ~ N(0, Σ_LRC(ζ)) per example (see the module docstring)."""

    default_lam = 1.0
    task_weight = 0.0  # pure augmentation (our choice)
    # L(x + noise) only: nothing is differentiated through the clean pass
    requires = Requirements(clean_graph=False)
    marginal_std: torch.Tensor

    def __init__(self, *, eps: float = 0.3, zetas: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0),
                 inter_channel: float = 0.5, scale: str | float = "data", bounds: tuple[float, float] | None = None,
                 perturbed_bn_policy: BNPolicy = "frozen") -> None:
        super().__init__(bounds=bounds)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"lrc-aug eps must be a finite number ≥ 0, got {eps}")
        zetas = [float(z) for z in ([zetas] if isinstance(zetas, (int, float)) else zetas)]
        if not zetas or not all(z > 0 for z in zetas):
            raise ValueError(f"lrc-aug zetas must be a non-empty list of decay lengths > 0, got {zetas}")
        if isinstance(scale, str) and scale not in SCALES:
            raise ValueError(f"lrc-aug scale must be one of {SCALES} or a number, got {scale!r}")
        if not isinstance(scale, str) and not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"lrc-aug scale must be ≥ 0, got {scale}")
        self.eps = float(eps)
        self.zetas = zetas
        self.inter_channel = float(inter_channel)
        self.scale = scale
        self.perturbed_bn_policy = check_policy(perturbed_bn_policy)
        # s, the noise's marginal standard deviation per unit ε; NaN until setup() for "data"
        fixed = {"unit": 1.0, "data": math.nan}.get(scale, scale) if isinstance(scale, str) else float(scale)
        self.register_buffer("marginal_std", torch.tensor(fixed, dtype=torch.float64))

    def setup(self, model: nn.Module | None, train_x: torch.Tensor,
              bounds: tuple[float, float] | None = None) -> None:
        """Take the data set's bounds and record σ_data = √(mean per-pixel variance of the
        training inputs) for ``scale="data"``."""
        super().setup(model, train_x, bounds)
        if self.scale == "data":
            self.marginal_std.fill_(math.sqrt(mean_marginal_variance(train_x)))

    def noise(self, x: torch.Tensor, ctx: CleanPass | None = None) -> torch.Tensor:
        """ε·s·ξ ``(N, C, H, W)``: LRC noise with a decay length drawn per example."""
        if torch.isnan(self.marginal_std):
            raise RuntimeError("lrc-aug scale='data' needs setup(model, train_x) before the first step "
                               "(or use scale='unit' or a number)")
        def draw(fn: Callable[..., torch.Tensor], like: torch.Tensor) -> torch.Tensor:
            return fn(like.shape, device=like.device, dtype=like.dtype) if ctx is None else ctx.noise_like(fn, like)

        z = draw(torch.randn, x)  # (N, C, H, W) standard normal, rank-independent in the loop
        u = draw(torch.rand, x.new_empty(x.shape[0]))  # (N,) uniform: which ζ per example
        pick = (u * len(self.zetas)).long().clamp_(max=len(self.zetas) - 1)  # (N,)
        xi = torch.empty_like(z)
        for k, zeta in enumerate(self.zetas):  # a loop over the few declared ζ, not over examples
            rows = (pick == k).nonzero().squeeze(1)
            if rows.numel():
                xi[rows] = lrc_transform(z[rows], zeta_px=zeta, inter_channel=self.inter_channel)
        return (self.eps * float(self.marginal_std)) * xi

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        x_noisy = (x.detach() + self.noise(x.detach(), ctx)).clamp(*self.bounds)  # no gradient into the noise
        with run_mode(model, perturbed_policy(model, self.perturbed_bn_policy)):
            outputs = forward_all(model, x_noisy)  # per head: (N, K_h)
        return Term(total(F.cross_entropy(out, t) for out, t in zip(outputs, split_targets(y))))

    def extra_repr(self) -> str:
        return (f"eps={self.eps}, zetas={self.zetas}, inter_channel={self.inter_channel}, scale={self.scale!r}, "
                f"bounds={self.bounds}, perturbed_bn_policy={self.perturbed_bn_policy!r}")
