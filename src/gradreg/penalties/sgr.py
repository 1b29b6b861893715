"""Structured gradient regularization (SGR) and gradient-norm regularization (GN) (SPEC §3).

Roth, Lucchi, Nowozin, Hofmann, "Adversarially Robust Training through Structured Gradient
Regularization", arXiv 1805.08736 (2018):

    L_SGR = E[−log p_y(x)] + λ·Ω_Σ,     Ω_Σ = ½·E[ ∇ₓlog p_y(x)ᵀ · Σ · ∇ₓlog p_y(x) ]

With g = ∇ₓL = −∇ₓlog p_y the quadratic form is ½·gᵀΣg. GN is Σ = I (½‖g‖₂²).
SGR is "quadratic form of the input gradient" (:class:`GradientQuadratic`) composed with "a
covariance estimator" (:mod:`.covariance`); GN is the same quadratic form with Σ = I:

* Σ is the raw (uncentred) second moment of perturbations ξ, as an exponential moving
  average  Σ_t = (1−β)·Σ_{t−1} + β·(1/m)·Σᵢ ξᵢξᵢᵀ  (β = 0.1), refreshed every ``update_every``
  training steps from the current batch. ``source`` picks ξ:
  ``grad``  ξ = eps·g/‖g‖₂ ,  ``sign``  ξ = eps·sign(g)  (both reuse the clean pass's g: free),
  ``fgsm``  ξ = FGSM(x) − x ,  ``pgd``  ξ = PGD(x) − x  (``attack_norm``, radius ``eps``, clipped
  to ``bounds``; extra passes under ``bn_policy``, default eval, modes restored). The attack
  sources ascend the cross-entropy of the true label (``labels="true"``, default) or of the
  model's predicted label (``labels="predicted"``: no label leaking, as the paper's
  adversarial baselines; :func:`.inner.attack_labels`).
* ``centred=True`` (default): Ω_Σ alone (the perturbations are taken as zero-mean).
  ``centred=False``: the uncentred Ω_{μ,Σ} = −E[∇ₓlog p_yᵀμ] + Ω_Σ = E[gᵀμ] + Ω_Σ, with μ the
  EMA of the mean perturbation (same β and schedule). In both variants Σ is the *raw* second
  moment E[ξξᵀ], not the covariance E[ξξᵀ] − μμᵀ (SPEC §3: E[(aᵀξ)²] = aᵀE[ξξᵀ]a).
* Representations: ``full`` keeps the d×d matrix; ``covfun`` keeps a stationary covariance
  function, [Σ]_{(c,p),(c',q)} = K_{cc'}(round(‖p − q‖₂)), one function within a channel and
  one between channels (colour). It is estimated by averaging ξ_a·ξ_b over all ordered pixel
  pairs at each rounded displacement, computed from the FFT autocorrelation of ξ (O(d log d),
  never d×d). Σ·g is the correlation of the gradient image with the (2k+1)×(2k+1) kernel
  K(round‖δ‖) (k < image size), evaluated as a product in the Fourier domain on a grid padded
  to 2H×2W, so there is no wrap-around: exactly the non-circular correlation with zero padding.
  The penalty needs only gᵀΣg, which Parseval turns into Σ_ω K̂(ω)|ĝ(ω)|²: one forward FFT of
  the gradient per step. ``auto`` = full if d ≤ 1024 else covfun. Every representation is
  positive semi-definite by construction, so Ω_Σ ≥ 0 (:mod:`.covariance` says how).
* Standardization: Σ is rescaled at use so its mean diagonal is the mean per-pixel variance of
  the training inputs (``data``, from ``setup(train_x)``, unbiased sample variance as in
  ``np.cov``), or 1 (``unit``), or left as estimated (``none``). λ then reads as a
  noise-to-signal ratio. μ is rescaled by the square root of the same factor (ξ's scale).
* A fixed Σ (no updates) can be read from ``sigma_file`` (.npy or .safetensors, never
  pickle): a d×d matrix (.npy 2-D, or key ``sigma``), or covariance functions (.npy 1-D =
  within-channel function; keys ``cov_intra``/``cov_inter``); optional key ``mean`` (μ). A
  matrix given to ``covfun`` is averaged over pixel pairs per displacement (d×d at load
  time only); functions given to ``full`` are expanded. Standardization still applies
  (``standardize="none"`` uses the file verbatim).

State (Σ, μ, update count, step count, data variance) lives in buffers, allocated with fixed
shapes by ``setup(model, train_x, bounds)`` (or, called standalone without setup, by the first
batch), so checkpoints restore Σ exactly. The attack sources clip to the data set's bounds
(from ``setup``) unless ``bounds`` is given. Σ is updated only while the penalty module is in training mode (the default);
``pen.eval()`` freezes it. Under torch.distributed each update averages the batch estimate
over all ranks' shards, so every rank keeps the same Σ.

Warning — our choices, not the paper's:
  * Before the first update Σ = I (SGR starts as a standardized GN); the first update
    *replaces* it with the batch estimate, later ones follow the EMA (no zero-initialized,
    biased average).
  * ``source="fgsm"`` with ``eps=0.1`` (input units, ℓ∞) by default; ``grad`` is normalized
    per sample so every example weighs the same.
  * ``update_every`` defaults to 1 for ``grad``/``sign`` (no extra pass) and 10 for
    ``fgsm``/``pgd`` (one extra forward/backward every 10 steps for FGSM). Measured on CPU
    (C&W CNN, 3×32×32, batch 64, one thread): covfun SGR with the defaults costs ≈ 1.03× a GN
    step (median), against ≈ 1.37× when FGSM refreshes Σ every step.
  * ``radius_pixels=None``: the covariance function is used at every displacement in the
    image; a radius r keeps only displacements with round(‖δ‖) ≤ r (for ``covfun``, and for
    ``full`` built from covariance functions in a file; an estimated full matrix is kept whole);
    the result is made PSD as every Σ is.
  * ``covfun`` averages the within-channel function over channels and the between-channel
    one over ordered channel pairs (c ≠ c'), as in the paper's intra/inter split.
  * ``default_lam``: 0.01 for GN, 0.1 for SGR with data standardization (similar effective
    noise variance on MNIST-like data, σ²_data ≈ 0.1); not tuned.
  * The uncentred mean μ is kept per pixel (d numbers), also for ``covfun``.

Example::

    pen = make("sgr", representation="covfun", source="fgsm", eps=8 / 255)
    pen = SGR(estimator=SigmaEstimator(representation="covfun"),            # the same, as specs
              perturbations=PerturbationSource(kind="fgsm", eps=8 / 255))
    pen.setup(model, train_x, bounds=(0.0, 1.0))
    loss = F.cross_entropy(model(x), y) + 0.1 * pen(model, x, y)
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from ..attacks.lrc import mean_marginal_variance
from ..attacks.pgd_core import ce_loss, pgd
from ..modes import BNPolicy, check_policy
from ..threat import ThreatModel, canonical_norm
from . import PENALTIES
from ..cleanpass import RANKS, Ranks
from .base import CleanPass, Penalty, Requirements, Term
from .covariance import (Covariance, CovFunCovariance, FullCovariance, IdentityCovariance, covfun_second_moment,
                         load_sigma_file)
from .inner import attack_labels, check_labels
from .norms import safe_l2

REPRESENTATIONS = ("full", "covfun", "auto")
SOURCES = ("grad", "sign", "fgsm", "pgd")
STANDARDIZATIONS = ("data", "unit", "none")
FULL_MAX_DIM = 1024  # ``auto`` keeps the full matrix up to this input dimension

__all__ = ["GN", "SGR", "GradientQuadratic", "PerturbationSource", "SigmaEstimator", "sgr_specs", "CovFunCovariance", "FullCovariance", "IdentityCovariance",
           "covfun_second_moment"]


class GradientQuadratic(Penalty):
    """Ω = ½·s·mean_i gᵢᵀΣgᵢ for the input gradients g = ∇ₓL of the clean pass, Σ = ``self.cov``
    scaled by ``scale()`` (1 here); subclasses supply Σ (and a mean term, see :class:`SGR`)."""

    requires = Requirements(input_grad=True, double_backward=True)
    cov: Covariance | None

    def __init__(self, cov: Covariance | None, *, bounds: tuple[float, float] | None = None) -> None:
        super().__init__(bounds=bounds)
        self.cov = cov

    def scale(self) -> torch.Tensor:
        """Factor s (0-dim float64 tensor) applied to Σ."""
        return torch.ones((), dtype=torch.float64)

    def matvec(self, g: torch.Tensor) -> torch.Tensor:
        """Σg with the scaled Σ, ``(N, C, H, W)``."""
        assert self.cov is not None
        return self.scale().to(g.device, g.dtype) * self.cov.matvec(g)

    def omega(self, g: torch.Tensor) -> torch.Tensor:
        """½·s·mean_i gᵢᵀΣgᵢ for input gradients ``(N, C, H, W)``."""
        assert self.cov is not None
        return 0.5 * self.scale().to(g.device, g.dtype) * self.cov.quadratic(g).mean()

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        return Term(self.omega(ctx.input_grad(0)))  # g = −∇ₓlog p_y, (N, C, H, W), differentiable


@PENALTIES.register("gn")
class GN(GradientQuadratic):
    """Gradient-norm regularization: ½‖∇ₓL‖₂² (SGR with Σ = I, Roth et al. 2018)."""

    default_lam = 0.01
    # a GN checkpoint written when GN was an SGR subclass also holds SGR's (unused) state
    legacy_state = ("mean", "num_updates", "step", "data_var")

    def __init__(self) -> None:
        super().__init__(IdentityCovariance())

    def extra_repr(self) -> str:
        return "Σ=I"


@dataclass(frozen=True)
class PerturbationSource:
    """Where the perturbations ξ that estimate Σ come from (the module doc's ``source``): the
    clean pass's gradient (``grad``, ``sign``: free) or an attack (``fgsm``, ``pgd``: radius
    ``eps`` in ``attack_norm``, under ``bn_policy``, ascending the ``labels``' loss)."""

    kind: str = "fgsm"
    eps: float = 0.1  # input units (our choice)
    attack_norm: str = "linf"
    pgd_steps: int = 10
    pgd_rel_stepsize: float = 0.25
    bn_policy: BNPolicy = "eval"
    labels: str = "true"

    def __post_init__(self) -> None:
        if self.kind not in SOURCES:
            raise ValueError(f"sgr source must be one of {SOURCES}, got {self.kind!r}")
        if not self.eps >= 0:
            raise ValueError(f"sgr eps must be ≥ 0, got {self.eps!r}")
        object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "attack_norm", canonical_norm(self.attack_norm))
        object.__setattr__(self, "pgd_steps", int(self.pgd_steps))
        object.__setattr__(self, "pgd_rel_stepsize", float(self.pgd_rel_stepsize))
        check_policy(self.bn_policy)
        check_labels(self.labels)

    @property
    def free(self) -> bool:
        """Whether ξ is read off the clean pass's input gradient (no extra pass)."""
        return self.kind in ("grad", "sign")


@dataclass(frozen=True)
class SigmaEstimator:
    """How Σ (and μ) are kept: the representation, the EMA (``beta``, every ``update_every``
    steps; None: 1 for a free source, 10 for an attack, our choice), the standardization, the
    uncentred mean (``centred=False``), the displacement radius and an optional fixed Σ file."""

    representation: str = "auto"
    beta: float = 0.1
    update_every: int | None = None
    standardize: str = "data"
    centred: bool = True
    radius_pixels: int | None = None
    sigma_file: str | None = None

    def __post_init__(self) -> None:
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"sgr representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        if self.standardize not in STANDARDIZATIONS:
            raise ValueError(f"sgr standardize must be one of {STANDARDIZATIONS}, got {self.standardize!r}")
        if not 0 < self.beta <= 1:
            raise ValueError(f"sgr beta must be in (0, 1], got {self.beta!r}")
        if self.update_every is not None and self.update_every < 1:
            raise ValueError(f"sgr update_every must be ≥ 1, got {self.update_every!r}")
        if self.radius_pixels is not None and self.radius_pixels < 0:
            raise ValueError(f"sgr radius_pixels must be ≥ 0, got {self.radius_pixels!r}")
        object.__setattr__(self, "beta", float(self.beta))
        object.__setattr__(self, "centred", bool(self.centred))
        if self.sigma_file is not None:
            object.__setattr__(self, "sigma_file", str(self.sigma_file))

    def for_source(self, source: PerturbationSource) -> SigmaEstimator:
        """This estimator with ``update_every`` resolved for ``source``."""
        if self.update_every is not None:
            return self
        return replace(self, update_every=1 if source.free else 10)


_SOURCE_PARAMS = {"source": "kind"} | {f.name: f.name for f in fields(PerturbationSource) if f.name != "kind"}
_ESTIMATOR_PARAMS = {f.name for f in fields(SigmaEstimator)}


def sgr_specs(params: Mapping[str, Any]) -> tuple[SigmaEstimator, PerturbationSource]:
    """The two specs from flat parameters (``make("sgr", source="pgd", eps=0.05)``, ``--set
    penalty.eps=0.05``); ``source`` names the kind of source."""
    unknown = sorted(set(params) - set(_SOURCE_PARAMS) - _ESTIMATOR_PARAMS)
    if unknown:
        raise TypeError(f"sgr got unexpected parameter(s) {', '.join(unknown)}")
    source = PerturbationSource(**{_SOURCE_PARAMS[k]: v for k, v in params.items() if k in _SOURCE_PARAMS})
    estimator = SigmaEstimator(**{k: v for k, v in params.items() if k in _ESTIMATOR_PARAMS})
    return estimator.for_source(source), source


@PENALTIES.register("sgr")
class SGR(GradientQuadratic):
    """Structured gradient regularization (Roth et al. 2018): ½·gᵀΣg with Σ from adversarial perturbations.

    Ω = ½·mean_i gᵢᵀ Σ gᵢ (+ mean_i gᵢᵀμ if uncentred), Σ estimated from perturbations.
    Configured by two specs, ``estimator`` (:class:`SigmaEstimator`) and ``perturbations``
    (:class:`PerturbationSource`), or by their fields as flat keyword parameters (what the
    command line's ``--set penalty.NAME=`` and the experiment files give; ``source`` is the
    source's kind)."""

    default_lam = 0.1
    mean: torch.Tensor
    num_updates: torch.Tensor
    step: torch.Tensor
    data_var: torch.Tensor

    def __init__(self, *, estimator: SigmaEstimator | None = None, perturbations: PerturbationSource | None = None,
                 bounds: tuple[float, float] | None = None, **params: Any) -> None:
        super().__init__(None, bounds=bounds)
        if params and (estimator is not None or perturbations is not None):
            raise TypeError("give sgr either its specs (estimator, perturbations) or flat parameters, not both")
        if estimator is None and perturbations is None:
            estimator, perturbations = sgr_specs(params)
        perturbations = perturbations or PerturbationSource()
        self.estimator = (estimator or SigmaEstimator()).for_source(perturbations)
        self.perturbations = perturbations
        sigma_file = self.estimator.sigma_file
        self._fixed = load_sigma_file(sigma_file) if sigma_file is not None else None
        # Placeholders until setup (or, standalone, the first batch) gives the input shape.
        self.register_buffer("mean", torch.zeros(0))  # (C, H, W): EMA of the mean perturbation μ
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("data_var", torch.full((), float("nan")))  # mean per-pixel variance

    # the specs' fields, read where the penalty's settings are asked for by name
    @property
    def source(self) -> str:
        return self.perturbations.kind

    @property
    def eps(self) -> float:
        return self.perturbations.eps

    @property
    def update_every(self) -> int:
        assert self.estimator.update_every is not None  # resolved by for_source
        return self.estimator.update_every

    def extra_repr(self) -> str:
        return f"estimator={self.estimator!r}, perturbations={self.perturbations!r}"

    # ---- state
    @property
    def updates_enabled(self) -> bool:
        return self._fixed is None

    @property
    def in_shape(self) -> tuple[int, int, int] | None:
        if self.mean.dim() != 3:
            return None
        c, h, w = self.mean.shape
        return (c, h, w)

    def resolved_representation(self, in_shape: tuple[int, int, int]) -> str:
        if self.estimator.representation == "auto":
            return "full" if math.prod(in_shape) <= FULL_MAX_DIM else "covfun"
        return self.estimator.representation

    def allocate(self, in_shape: tuple[int, ...]) -> None:
        """Create the buffers for inputs of shape ``(C, H, W)``: Σ = I (or the fixed Σ), μ = 0."""
        if len(in_shape) != 3:
            raise ValueError(f"sgr needs image inputs (N, C, H, W), got per-sample shape {tuple(in_shape)}")
        shape = (int(in_shape[0]), int(in_shape[1]), int(in_shape[2]))
        device, dtype = self.mean.device, self.mean.dtype  # follow .to() / .double() of the module
        self.mean = torch.zeros(shape, device=device, dtype=dtype)
        rep = self.resolved_representation(shape)
        if rep == "full":
            self.cov = FullCovariance(shape, radius_pixels=self.estimator.radius_pixels, device=device, dtype=dtype)
        elif rep == "covfun":
            self.cov = CovFunCovariance(shape, radius_pixels=self.estimator.radius_pixels, device=device, dtype=dtype)
        if self._fixed is not None:
            assert self.cov is not None
            self.cov.set_fixed(self._fixed, shape)
            if "mean" in self._fixed:
                self.mean.copy_(self._fixed["mean"].reshape(shape).to(self.mean))

    def _ensure_allocated(self, x: torch.Tensor) -> None:
        shape = tuple(x.shape[1:])
        if self.in_shape is None:
            self.allocate(shape)
        elif self.in_shape != shape:
            raise ValueError(f"sgr was set up for inputs {self.in_shape}, got {shape}")

    def setup(self, model: nn.Module | None, train_x: torch.Tensor,
              bounds: tuple[float, float] | None = None) -> None:
        """Take the data set's bounds, allocate Σ for the training inputs and record their mean
        per-pixel variance."""
        super().setup(model, train_x, bounds)
        self.allocate(tuple(train_x.shape[1:]))
        self.data_var.fill_(mean_marginal_variance(train_x))

    # ---- Σ
    def scale(self) -> torch.Tensor:
        """Factor s (0-dim float64 tensor) with mean diag(s·Σ) = target; 1 for ``none``."""
        assert self.cov is not None
        one = torch.ones((), dtype=torch.float64, device=self.data_var.device)
        if self.estimator.standardize == "none":
            return one
        if self.estimator.standardize == "unit":
            target = one
        else:
            if torch.isnan(self.data_var):
                raise RuntimeError("sgr standardize='data' needs setup(model, train_x) before the first step "
                                   "(or use standardize='unit' / 'none')")
            target = self.data_var.double()
        md = self.cov.mean_diag().double().to(one.device)
        return torch.where(md > 0, target / md.clamp_min(1e-300), torch.zeros_like(one))

    @torch.no_grad()
    def update(self, xi: torch.Tensor, ranks: Ranks = RANKS) -> None:
        """One EMA step of Σ (and μ) from perturbations ``(m, C, H, W)``, averaged over the
        shards of every rank of ``ranks`` so each keeps the same Σ."""
        assert self.cov is not None
        xi = xi.detach()
        first = int(self.num_updates) == 0
        *estimate, batch_mean = ranks.average([*self.cov.batch_estimate(xi), xi.mean(dim=0).to(self.mean)],
                                              xi.shape[0])
        beta = self.estimator.beta
        self.cov.ema(estimate, beta=beta, first=first)
        self.mean.copy_(batch_mean if first else (1 - beta) * self.mean + beta * batch_mean)
        self.num_updates += 1

    def draw_perturbations(self, model: nn.Module, ctx: CleanPass, g: torch.Tensor) -> torch.Tensor:
        """ξ for the EMA, detached ``(N, C, H, W)``; ``g`` is the clean input gradient."""
        g = g.detach()
        src = self.perturbations
        if src.kind == "grad":
            return src.eps * g / safe_l2(g).clamp_min(1e-30).view(-1, *([1] * (g.dim() - 1)))
        if src.kind == "sign":
            return src.eps * g.sign()
        threat = ThreatModel(norm=src.attack_norm, eps=src.eps, bounds=self.bounds)
        x = ctx.x.detach()
        target = attack_labels(model, x, ctx.y, ctx, labels=src.labels, bn_policy=src.bn_policy)  # (N,)
        loss_fn = ce_loss(target)
        if src.kind == "fgsm":
            x_adv = pgd(model, x, threat, loss_fn, steps=1, rel_stepsize=1.0, random_start=False,
                        bn_policy=src.bn_policy)
        else:
            x_adv = pgd(model, x, threat, loss_fn, steps=src.pgd_steps, rel_stepsize=src.pgd_rel_stepsize,
                        random_start=True, sampler=ctx.sampler, bn_policy=src.bn_policy)
        return (x_adv - x).detach()

    # ---- the penalty
    def omega(self, g: torch.Tensor) -> torch.Tensor:
        """½·mean_i gᵢᵀΣgᵢ (+ mean_i gᵢᵀμ when uncentred) for input gradients g = ∇ₓL ``(N, C, H, W)``."""
        assert self.cov is not None
        s = self.scale().to(g.device, g.dtype)
        quad = self.cov.quadratic(g)  # (N,)
        value = 0.5 * s * quad.mean()
        if not self.estimator.centred:
            value = value + s.sqrt() * (g * self.mean.to(g.dtype)).flatten(1).sum(dim=1).mean()
        return value

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        self._ensure_allocated(x)
        if self.estimator.standardize == "data" and torch.isnan(self.data_var):
            warnings.warn("sgr: setup(model, train_x) was not called; standardizing Σ with the first batch's "
                          "per-pixel variance instead", RuntimeWarning, stacklevel=2)
            self.data_var.fill_(mean_marginal_variance(x.detach()))
        g = ctx.input_grad(0)  # (N, C, H, W), differentiable; g = −∇ₓlog p_y
        if self.training and self.updates_enabled:
            if int(self.step) % self.update_every == 0:
                self.update(self.draw_perturbations(model, ctx, g), ctx.ranks)
            self.step += 1
        return Term(self.omega(g))
