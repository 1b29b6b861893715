"""Structured gradient regularization (SGR) and gradient-norm regularization (GN) (SPEC §3).

Roth, Lucchi, Nowozin, Hofmann, "Adversarially Robust Training through Structured Gradient
Regularization", arXiv 1805.08736 (2018):

    L_SGR = E[−log p_y(x)] + λ·Ω_Σ,     Ω_Σ = ½·E[ ∇ₓlog p_y(x)ᵀ · Σ · ∇ₓlog p_y(x) ]

With g = ∇ₓL = −∇ₓlog p_y the quadratic form is ½·gᵀΣg. GN is Σ = I (½‖g‖₂²).
SGR is "quadratic form of the input gradient" composed with "a covariance estimator":

* Σ is the raw (uncentred) second moment of perturbations ξ, as an exponential moving
  average  Σ_t = (1−β)·Σ_{t−1} + β·(1/m)·Σᵢ ξᵢξᵢᵀ  (β = 0.1), refreshed every ``update_every``
  training steps from the current batch. ``source`` picks ξ:
  ``grad``  ξ = eps·g/‖g‖₂ ,  ``sign``  ξ = eps·sign(g)  (both reuse the clean pass's g: free),
  ``fgsm``  ξ = FGSM(x) − x ,  ``pgd``  ξ = PGD(x) − x  (``attack_norm``, radius ``eps``, clipped
  to ``bounds``; extra passes under ``bn_policy``, default eval, modes restored).
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
  the gradient per step. ``auto`` = full if d ≤ 1024 else covfun.
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
shapes by ``setup`` (or the first batch, or ``load_state_dict``), so checkpoints restore Σ
exactly. Σ is updated only while the penalty module is in training mode (the default);
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
    ``full`` built from covariance functions in a file; an estimated full matrix is kept whole). A truncated function or
    the per-displacement average need not be positive semi-definite.
  * ``covfun`` averages the within-channel function over channels and the between-channel
    one over ordered channel pairs (c ≠ c'), as in the paper's intra/inter split.
  * ``default_lam``: 0.01 for GN, 0.1 for SGR with data standardization (similar effective
    noise variance on MNIST-like data, σ²_data ≈ 0.1); not tuned.
  * The uncentred mean μ is kept per pixel (d numbers), also for ``covfun``.

Example::

    pen = make("sgr", representation="covfun", source="fgsm", eps=8 / 255)
    pen.setup(train_x)
    loss = F.cross_entropy(model(x), y) + 0.1 * pen(model, x, y)
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..attacks.pgd_core import ce_loss, pgd
from ..modes import BN_POLICIES
from ..threat import ThreatModel, canonical_norm
from . import PENALTIES
from .base import CleanPass, Penalty, main_targets, sampler_of
from .datagrad import safe_l2

REPRESENTATIONS = ("full", "covfun", "auto")
SOURCES = ("grad", "sign", "fgsm", "pgd")
STANDARDIZATIONS = ("data", "unit", "none")
FULL_MAX_DIM = 1024  # ``auto`` keeps the full matrix up to this input dimension


# --------------------------------------------------------------------------- displacements
def max_displacement_bin(h: int, w: int) -> int:
    """Largest rounded Euclidean displacement between two pixels of an h×w image."""
    return int(round(math.hypot(h - 1, w - 1)))


def displacement_grid(h: int, w: int, device: torch.device | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the 2h×2w FFT grid, read each index (iy, ix) as a displacement δ = (dy, dx) modulo
    the grid and return its rounded length ``bins`` (long), the number of ordered pixel pairs
    of an h×w image at that displacement ``pairs`` (float64), and ``valid`` (|dy| < h, |dx| < w)."""
    iy = torch.arange(2 * h, device=device)
    ix = torch.arange(2 * w, device=device)
    dy = torch.where(iy < h, iy, iy - 2 * h)  # (2h,) in [−h, h)
    dx = torch.where(ix < w, ix, ix - 2 * w)  # (2w,)
    valid = (dy.abs() < h)[:, None] & (dx.abs() < w)[None, :]  # (2h, 2w)
    dist = torch.sqrt((dy[:, None] ** 2 + dx[None, :] ** 2).double())
    bins = torch.round(dist).long().clamp_max(max_displacement_bin(h, w))
    pairs = ((h - dy.abs())[:, None] * (w - dx.abs())[None, :]).double() * valid
    return bins, pairs, valid


def pixel_pair_bins(h: int, w: int) -> torch.Tensor:
    """Rounded Euclidean distance between every pair of pixel positions, ``(h·w, h·w)``."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], dim=1).double()  # (hw, 2)
    return torch.round(torch.cdist(pos, pos)).long()


def _abs2(z: torch.Tensor) -> torch.Tensor:
    """|z|² of a complex tensor as re² + im² (smooth at 0, unlike abs().pow(2))."""
    return torch.view_as_real(z).pow(2).sum(dim=-1)


def covfun_second_moment(xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stationary estimate of E[ξξᵀ] from perturbations ``(m, C, H, W)``: the within-channel
    and between-channel covariance functions, each ``(R+1,)`` indexed by rounded displacement.

    K_intra(r) = mean of ξ_{i,c,p}·ξ_{i,c,q} over samples i, channels c and ordered pixel pairs
    (p, q) with round(‖p − q‖) = r; K_inter(r) likewise over channel pairs c ≠ c'. The sums over
    pixel pairs are autocorrelations, read off |FFT(ξ)|² on a 2H×2W zero-padded grid.
    """
    m, c, h, w = xi.shape
    bins, pairs, valid = displacement_grid(h, w, xi.device)
    spec = torch.fft.rfft2(xi, s=(2 * h, 2 * w))  # (m, C, 2H, W+1)
    power_intra = _abs2(spec).sum(dim=(0, 1))  # Σ_i Σ_c |ξ̂_ic|²
    power_all = _abs2(spec.sum(dim=1)).sum(dim=0)  # Σ_i |Σ_c ξ̂_ic|²
    auto_intra = torch.fft.irfft2(power_intra, s=(2 * h, 2 * w))  # (2H, 2W): Σ Σ_p ξ_p ξ_{p+δ}
    auto_inter = torch.fft.irfft2(power_all, s=(2 * h, 2 * w)) - auto_intra
    nbins = max_displacement_bin(h, w) + 1
    b = bins[valid]
    npairs = torch.zeros(nbins, dtype=torch.float64, device=xi.device).index_add_(0, b, pairs[valid])
    s_intra = torch.zeros(nbins, dtype=torch.float64, device=xi.device).index_add_(0, b, auto_intra[valid].double())
    s_inter = torch.zeros(nbins, dtype=torch.float64, device=xi.device).index_add_(0, b, auto_inter[valid].double())
    intra = s_intra / (m * c * npairs)
    inter = s_inter / (m * c * (c - 1) * npairs) if c > 1 else torch.zeros_like(intra)
    return intra, inter


def covfun_from_matrix(sigma: torch.Tensor, in_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Average a d×d matrix over index pairs at each rounded displacement (within / between
    channels): the stationary projection used when a file gives a matrix to ``covfun``."""
    c, h, w = in_shape
    hw = h * w
    blocks = sigma.double().reshape(c, hw, c, hw).permute(0, 2, 1, 3)  # (C, C, hw, hw)
    same = torch.eye(c, dtype=torch.bool, device=sigma.device)
    intra_sum = blocks[same].sum(dim=0)  # (hw, hw) Σ_c S[c, c]
    inter_sum = blocks.sum(dim=(0, 1)) - intra_sum
    bins = pixel_pair_bins(h, w).to(sigma.device).flatten()  # (hw·hw,)
    nbins = max_displacement_bin(h, w) + 1

    def per_bin(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(nbins, dtype=torch.float64, device=sigma.device).index_add_(0, bins, v.flatten())

    counts = per_bin(torch.ones(hw * hw, dtype=torch.float64, device=sigma.device))
    intra = per_bin(intra_sum) / (c * counts)
    inter = per_bin(inter_sum) / (c * (c - 1) * counts) if c > 1 else torch.zeros_like(intra)
    return intra, inter


def matrix_from_covfun(intra: torch.Tensor, inter: torch.Tensor, in_shape: tuple[int, int, int],
                       radius_pixels: int | None = None) -> torch.Tensor:
    """The d×d matrix of a stationary covariance function (for ``full`` from a function file)."""
    c, h, w = in_shape
    bins = pixel_pair_bins(h, w).to(intra.device)  # (hw, hw)
    keep = bins <= (radius_pixels if radius_pixels is not None else int(bins.max()))
    zero = torch.zeros((), dtype=intra.dtype, device=intra.device)
    k_intra = torch.where(keep, intra[bins], zero)
    k_inter = torch.where(keep, inter[bins], zero)
    eye = torch.eye(c, dtype=intra.dtype, device=intra.device)[:, None, :, None]  # (C, 1, C, 1)
    blocks = eye * k_intra[None, :, None, :] + (1 - eye) * k_inter[None, :, None, :]  # (C, hw, C, hw)
    return blocks.reshape(c * h * w, c * h * w)


def _fit_length(v: torch.Tensor, n: int) -> torch.Tensor:
    """Truncate, or pad with zeros (no covariance beyond the given range), to length n."""
    v = v.flatten()
    if v.numel() >= n:
        return v[:n]
    return torch.cat([v, v.new_zeros(n - v.numel())])


def load_sigma_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a fixed Σ from .npy (no pickle) or .safetensors into ``sigma`` / ``cov_intra`` /
    ``cov_inter`` / ``mean`` tensors (float64)."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
        if t.dim() == 2 and t.shape[0] == t.shape[1]:
            return {"sigma": t}
        if t.dim() == 1:
            return {"cov_intra": t}
        raise ValueError(f"{path}: a .npy Σ must be a square matrix or a 1-D covariance function, "
                         f"got shape {tuple(t.shape)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(path))
        known = {"sigma", "cov_intra", "cov_inter", "mean"}
        if unknown := set(raw) - known:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        if "sigma" not in raw and "cov_intra" not in raw:
            raise ValueError(f"{path}: needs a 'sigma' matrix or a 'cov_intra' function")
        return {k: v.double() for k, v in raw.items()}
    raise ValueError(f"sigma_file must be .npy or .safetensors, got {path.name!r}")


def mean_pixel_variance(x: torch.Tensor, *, chunk: int = 4096) -> float:
    """Mean over input coordinates of the unbiased per-coordinate variance over samples (the
    mean diagonal of ``np.cov`` of the flattened inputs), in float64, chunked over samples so
    a large training set is never copied at once."""
    n = x.shape[0]
    if n < 2:
        return 0.0
    flat = x.flatten(1)
    total = torch.zeros(flat.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk):
        total += flat[i:i + chunk].double().sum(dim=0)
    mean = total / n
    ssq = torch.zeros_like(mean)
    for i in range(0, n, chunk):
        ssq += (flat[i:i + chunk].double() - mean).pow(2).sum(dim=0)
    return float((ssq / (n - 1)).mean())


def _average_over_ranks(estimates: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Under data parallelism every rank sees its own shard of the batch: replace each rank's
    per-sample average by the average over the whole global batch (weighted by shard size), so
    Σ and μ stay identical on every rank. A no-op in a single process."""
    if not distributed.is_active():
        return estimates
    total = distributed.all_reduce_sum_(torch.tensor([float(count)], dtype=torch.float64,
                                                     device=estimates[0].device))
    return [distributed.all_reduce_sum_(t * count) / total.to(t.dtype) for t in estimates]


# --------------------------------------------------------------------------- covariances
class Covariance(nn.Module):
    """A representation of (unstandardized) Σ: ``matvec`` (Σg), ``mean_diag``, an EMA
    ``update`` from perturbations, and ``set_fixed`` from a file."""

    def matvec(self, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quadratic(self, g: torch.Tensor) -> torch.Tensor:
        """Per-sample gᵢᵀΣgᵢ, ``(N,)``."""
        return (g * self.matvec(g)).flatten(1).sum(dim=1)

    def mean_diag(self) -> torch.Tensor:
        raise NotImplementedError

    def batch_estimate(self, xi: torch.Tensor) -> list[torch.Tensor]:
        """This representation's estimate of (1/m)·Σᵢ ξᵢξᵢᵀ from perturbations ``(m, C, H, W)``."""
        raise NotImplementedError

    def ema(self, estimate: list[torch.Tensor], *, beta: float, first: bool) -> None:
        """Σ ← estimate on the first update, else (1 − β)·Σ + β·estimate."""
        raise NotImplementedError

    def update(self, xi: torch.Tensor, *, beta: float, first: bool) -> None:
        self.ema(self.batch_estimate(xi), beta=beta, first=first)

    def set_fixed(self, fixed: dict[str, torch.Tensor], in_shape: tuple[int, int, int]) -> None:
        raise NotImplementedError


class IdentityCovariance(Covariance):
    """Σ = I (GN)."""

    def matvec(self, g: torch.Tensor) -> torch.Tensor:
        return g

    def mean_diag(self) -> torch.Tensor:
        return torch.ones(())


class FullCovariance(Covariance):
    """An explicit d×d matrix, for small inputs."""

    def __init__(self, in_shape: tuple[int, int, int], *, radius_pixels: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.radius_pixels = radius_pixels  # only for Σ built from covariance functions
        d = math.prod(in_shape)
        self.register_buffer("sigma", torch.eye(d, device=device, dtype=dtype))  # (d, d)

    def matvec(self, g: torch.Tensor) -> torch.Tensor:
        return (g.flatten(1) @ self.sigma.to(g.dtype)).view_as(g)  # Σ symmetric: (Σg)ᵀ = gᵀΣ

    def mean_diag(self) -> torch.Tensor:
        return self.sigma.diagonal().mean()

    @torch.no_grad()
    def batch_estimate(self, xi: torch.Tensor) -> list[torch.Tensor]:
        flat = xi.flatten(1).to(self.sigma.dtype)  # (m, d)
        return [flat.T @ flat / flat.shape[0]]  # (d, d) raw second moment

    @torch.no_grad()
    def ema(self, estimate: list[torch.Tensor], *, beta: float, first: bool) -> None:
        (batch,) = estimate
        self.sigma.copy_(batch if first else (1 - beta) * self.sigma + beta * batch)

    @torch.no_grad()
    def set_fixed(self, fixed: dict[str, torch.Tensor], in_shape: tuple[int, int, int]) -> None:
        if "sigma" in fixed:
            s = fixed["sigma"]
            if s.shape != self.sigma.shape:
                raise ValueError(f"fixed Σ has shape {tuple(s.shape)}, inputs need {tuple(self.sigma.shape)}")
            s = 0.5 * (s + s.T)  # only the symmetric part enters a quadratic form
        else:
            n = max_displacement_bin(*in_shape[1:]) + 1
            intra = _fit_length(fixed["cov_intra"], n)
            inter = _fit_length(fixed.get("cov_inter", torch.zeros(n, dtype=torch.float64)), n)
            s = matrix_from_covfun(intra, inter, in_shape, self.radius_pixels)
        self.sigma.copy_(s.to(self.sigma))


class CovFunCovariance(Covariance):
    """A stationary covariance function of rounded pixel displacement (within and between
    channels), applied as a correlation through the FFT. Memory O(d), never d×d."""

    def __init__(self, in_shape: tuple[int, int, int], *, radius_pixels: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        c, h, w = in_shape
        self.in_shape = (c, h, w)
        self.radius_pixels = radius_pixels
        n = max_displacement_bin(h, w) + 1
        intra = torch.zeros(n, device=device, dtype=dtype)
        intra[0] = 1.0  # identity until the first update
        self.register_buffer("cov_intra", intra)  # (R+1,)
        self.register_buffer("cov_inter", torch.zeros(n, device=device, dtype=dtype))  # (R+1,)
        bins, _, valid = displacement_grid(h, w, device)
        if radius_pixels is not None:
            valid = valid & (bins <= radius_pixels)
        self.register_buffer("_bins", bins, persistent=False)  # (2H, 2W)
        self.register_buffer("_support", valid, persistent=False)  # (2H, 2W)

    def _spectrum(self, fun: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Fourier transform of the kernel K(round‖δ‖) on the padded grid, ``(2H, W+1)``, real
        because K(δ) = K(−δ)."""
        zero = torch.zeros((), dtype=dtype, device=fun.device)
        kernel = torch.where(self._support, fun.to(dtype)[self._bins], zero)  # (2H, 2W)
        return torch.fft.rfft2(kernel).real

    def matvec(self, g: torch.Tensor) -> torch.Tensor:
        _, h, w = self.in_shape
        spec_g = torch.fft.rfft2(g, s=(2 * h, 2 * w))  # (N, C, 2H, W+1)
        k_intra = self._spectrum(self.cov_intra, g.dtype)
        k_inter = self._spectrum(self.cov_inter, g.dtype)
        # (Σg)_c = K_intra ⋆ g_c + K_inter ⋆ Σ_{c'≠c} g_c'
        out = (k_intra - k_inter) * spec_g + k_inter * spec_g.sum(dim=1, keepdim=True)
        return torch.fft.irfft2(out, s=(2 * h, 2 * w))[..., :h, :w]  # (N, C, H, W)

    def quadratic(self, g: torch.Tensor) -> torch.Tensor:
        """gᵀΣg by Parseval, one forward FFT and no inverse (the training-time path):
        gᵀ(K ⋆ g) = (1/P)·Σ_ω K̂(ω)·|ĝ(ω)|² on the P-point padded grid; the half spectrum of
        rfft2 counts every column twice except the 0th and the Nyquist one."""
        _, h, w = self.in_shape
        spec_g = torch.fft.rfft2(g, s=(2 * h, 2 * w))  # (N, C, 2H, W+1)
        k_intra = self._spectrum(self.cov_intra, g.dtype)
        k_inter = self._spectrum(self.cov_inter, g.dtype)
        weight = torch.full((w + 1,), 2.0, dtype=g.dtype, device=g.device)
        weight[0] = weight[w] = 1.0
        per_freq = (k_intra - k_inter) * _abs2(spec_g).sum(dim=1) + k_inter * _abs2(spec_g.sum(dim=1))  # (N, 2H, W+1)
        return (per_freq * weight).sum(dim=(1, 2)) / (4 * h * w)

    def mean_diag(self) -> torch.Tensor:
        return self.cov_intra[0]

    @torch.no_grad()
    def batch_estimate(self, xi: torch.Tensor) -> list[torch.Tensor]:
        intra, inter = covfun_second_moment(xi)
        return [intra.to(self.cov_intra), inter.to(self.cov_inter)]

    @torch.no_grad()
    def ema(self, estimate: list[torch.Tensor], *, beta: float, first: bool) -> None:
        intra, inter = estimate
        if first:
            self.cov_intra.copy_(intra)
            self.cov_inter.copy_(inter)
        else:
            self.cov_intra.mul_(1 - beta).add_(beta * intra)
            self.cov_inter.mul_(1 - beta).add_(beta * inter)

    @torch.no_grad()
    def set_fixed(self, fixed: dict[str, torch.Tensor], in_shape: tuple[int, int, int]) -> None:
        n = self.cov_intra.numel()
        if "cov_intra" in fixed:
            intra = _fit_length(fixed["cov_intra"], n)
            inter = _fit_length(fixed.get("cov_inter", torch.zeros(n, dtype=torch.float64)), n)
        else:
            d = math.prod(in_shape)
            if tuple(fixed["sigma"].shape) != (d, d):
                raise ValueError(f"fixed Σ has shape {tuple(fixed['sigma'].shape)}, inputs need {(d, d)}")
            intra, inter = covfun_from_matrix(fixed["sigma"], in_shape)
        self.cov_intra.copy_(intra.to(self.cov_intra))
        self.cov_inter.copy_(inter.to(self.cov_inter))


# --------------------------------------------------------------------------- the penalty
class SGR(Penalty):
    """Ω = ½·mean_i gᵢᵀ Σ gᵢ (+ mean_i gᵢᵀμ if uncentred), Σ estimated from perturbations."""

    needs_input_grad = True
    default_lam = 0.1

    def __init__(
        self,
        *,
        representation: str = "auto",
        source: str = "fgsm",
        eps: float = 0.1,
        attack_norm: str = "linf",
        bounds: tuple[float, float] = (0.0, 1.0),
        pgd_steps: int = 10,
        pgd_rel_stepsize: float = 0.25,
        beta: float = 0.1,
        update_every: int | None = None,
        standardize: str = "data",
        centred: bool = True,
        radius_pixels: int | None = None,
        sigma_file: str | Path | None = None,
        bn_policy: str = "eval",
        identity: bool = False,
    ) -> None:
        super().__init__()
        if representation not in REPRESENTATIONS:
            raise ValueError(f"sgr representation must be one of {REPRESENTATIONS}, got {representation!r}")
        if source not in SOURCES:
            raise ValueError(f"sgr source must be one of {SOURCES}, got {source!r}")
        if standardize not in STANDARDIZATIONS:
            raise ValueError(f"sgr standardize must be one of {STANDARDIZATIONS}, got {standardize!r}")
        if bn_policy not in BN_POLICIES:
            raise ValueError(f"sgr bn_policy must be one of {BN_POLICIES}, got {bn_policy!r}")
        if not 0 < beta <= 1:
            raise ValueError(f"sgr beta must be in (0, 1], got {beta!r}")
        if update_every is None:
            update_every = 1 if source in ("grad", "sign") else 10
        if update_every < 1:
            raise ValueError(f"sgr update_every must be ≥ 1, got {update_every!r}")
        if radius_pixels is not None and radius_pixels < 0:
            raise ValueError(f"sgr radius_pixels must be ≥ 0, got {radius_pixels!r}")
        if not eps >= 0:
            raise ValueError(f"sgr eps must be ≥ 0, got {eps!r}")
        self.identity = bool(identity)  # Σ = I: GN
        self.representation = representation
        self.source = source
        self.eps = float(eps)
        self.attack_norm = canonical_norm(attack_norm)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.pgd_steps = int(pgd_steps)
        self.pgd_rel_stepsize = float(pgd_rel_stepsize)
        self.beta = float(beta)
        self.update_every = int(update_every)
        self.standardize = standardize
        self.centred = bool(centred)
        self.radius_pixels = radius_pixels
        self.sigma_file = None if sigma_file is None else str(sigma_file)
        self.bn_policy = bn_policy
        self._fixed = load_sigma_file(sigma_file) if sigma_file is not None else None
        self.cov: Covariance | None = IdentityCovariance() if self.identity else None
        # Placeholders until setup / the first batch / load_state_dict give the input shape.
        self.register_buffer("mean", torch.zeros(0))  # (C, H, W): EMA of the mean perturbation μ
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("data_var", torch.full((), float("nan")))  # mean per-pixel variance

    def extra_repr(self) -> str:
        skip = {"identity", "cov"}
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if not k.startswith("_") and k != "training" and k not in skip)

    # ---- state
    @property
    def updates_enabled(self) -> bool:
        return not self.identity and self._fixed is None

    @property
    def in_shape(self) -> tuple[int, int, int] | None:
        return tuple(self.mean.shape) if self.mean.dim() == 3 else None  # type: ignore[return-value]

    def resolved_representation(self, in_shape: tuple[int, int, int]) -> str:
        if self.identity:
            return "identity"
        if self.representation == "auto":
            return "full" if math.prod(in_shape) <= FULL_MAX_DIM else "covfun"
        return self.representation

    def allocate(self, in_shape: tuple[int, ...]) -> None:
        """Create the buffers for inputs of shape ``(C, H, W)``: Σ = I (or the fixed Σ), μ = 0."""
        if len(in_shape) != 3:
            raise ValueError(f"sgr needs image inputs (N, C, H, W), got per-sample shape {tuple(in_shape)}")
        shape = (int(in_shape[0]), int(in_shape[1]), int(in_shape[2]))
        device, dtype = self.mean.device, self.mean.dtype  # follow .to() / .double() of the module
        self.mean = torch.zeros(shape, device=device, dtype=dtype)
        rep = self.resolved_representation(shape)
        if rep == "full":
            self.cov = FullCovariance(shape, radius_pixels=self.radius_pixels, device=device, dtype=dtype)
        elif rep == "covfun":
            self.cov = CovFunCovariance(shape, radius_pixels=self.radius_pixels, device=device, dtype=dtype)
        if self._fixed is not None and not self.identity:
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

    def setup(self, train_x: torch.Tensor) -> None:
        """Allocate Σ for the training inputs and record their mean per-pixel variance."""
        self.allocate(tuple(train_x.shape[1:]))
        self.data_var.fill_(mean_pixel_variance(train_x))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A fresh module learns the input shape from the checkpoint, so loading needs no setup.
        incoming = state_dict.get(prefix + "mean")
        if incoming is not None and incoming.dim() == 3 and self.in_shape != tuple(incoming.shape):
            self.allocate(tuple(incoming.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- Σ
    def scale(self) -> torch.Tensor:
        """Factor s (0-dim float64 tensor) with mean diag(s·Σ) = target; 1 for ``none``."""
        assert self.cov is not None
        one = torch.ones((), dtype=torch.float64, device=self.data_var.device)
        if self.standardize == "none":
            return one
        if self.standardize == "unit":
            target = one
        else:
            if torch.isnan(self.data_var):
                raise RuntimeError("sgr standardize='data' needs setup(train_x) before the first step "
                                   "(or use standardize='unit' / 'none')")
            target = self.data_var.double()
        md = self.cov.mean_diag().double().to(one.device)
        return torch.where(md > 0, target / md.clamp_min(1e-300), torch.zeros_like(one))

    def matvec(self, g: torch.Tensor) -> torch.Tensor:
        """Σg with the standardized Σ, ``(N, C, H, W)``."""
        assert self.cov is not None
        return self.scale().to(g.device, g.dtype) * self.cov.matvec(g)

    @torch.no_grad()
    def update(self, xi: torch.Tensor) -> None:
        """One EMA step of Σ (and μ) from perturbations ``(m, C, H, W)``."""
        assert self.cov is not None
        xi = xi.detach()
        first = int(self.num_updates) == 0
        *estimate, batch_mean = _average_over_ranks([*self.cov.batch_estimate(xi), xi.mean(dim=0).to(self.mean)],
                                                    xi.shape[0])
        self.cov.ema(estimate, beta=self.beta, first=first)
        self.mean.copy_(batch_mean if first else (1 - self.beta) * self.mean + self.beta * batch_mean)
        self.num_updates += 1

    def perturbations(self, model: nn.Module, ctx: CleanPass, g: torch.Tensor) -> torch.Tensor:
        """ξ for the EMA, detached ``(N, C, H, W)``; ``g`` is the clean input gradient."""
        g = g.detach()
        if self.source == "grad":
            return self.eps * g / safe_l2(g).clamp_min(1e-30).view(-1, *([1] * (g.dim() - 1)))
        if self.source == "sign":
            return self.eps * g.sign()
        threat = ThreatModel(norm=self.attack_norm, eps=self.eps, bounds=self.bounds)
        x = ctx.x.detach()
        loss_fn = ce_loss(main_targets(ctx.y))
        if self.source == "fgsm":
            x_adv = pgd(model, x, threat, loss_fn, steps=1, rel_stepsize=1.0, random_start=False,
                        bn_policy=self.bn_policy)  # type: ignore[arg-type]
        else:
            x_adv = pgd(model, x, threat, loss_fn, steps=self.pgd_steps, rel_stepsize=self.pgd_rel_stepsize,
                        random_start=True, sampler=sampler_of(ctx), bn_policy=self.bn_policy)  # type: ignore[arg-type]
        return (x_adv - x).detach()

    # ---- the penalty
    def omega(self, g: torch.Tensor) -> torch.Tensor:
        """½·mean_i gᵢᵀΣgᵢ (+ mean_i gᵢᵀμ when uncentred) for input gradients g = ∇ₓL ``(N, C, H, W)``."""
        assert self.cov is not None
        s = self.scale().to(g.device, g.dtype)
        quad = self.cov.quadratic(g)  # (N,)
        value = 0.5 * s * quad.mean()
        if not self.centred:
            value = value + s.sqrt() * (g * self.mean.to(g.dtype)).flatten(1).sum(dim=1).mean()
        return value

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass | None = None) -> torch.Tensor:
        ctx = self.context(model, x, y, ctx)
        self._ensure_allocated(x)
        if self.standardize == "data" and torch.isnan(self.data_var):
            warnings.warn("sgr: setup(train_x) was not called; standardizing Σ with the first batch's "
                          "per-pixel variance instead", RuntimeWarning, stacklevel=2)
            self.data_var.fill_(mean_pixel_variance(x.detach()))
        g = ctx.input_grad(0)  # (N, C, H, W), differentiable; g = −∇ₓlog p_y
        if self.training and self.updates_enabled:
            if int(self.step) % self.update_every == 0:
                self.update(self.perturbations(model, ctx, g))
            self.step += 1
        return self.omega(g)


class GN(SGR):
    """Ω = ½·mean_i ‖gᵢ‖₂²: SGR with Σ = I, never updated, not standardized."""

    default_lam = 0.01

    def __init__(self) -> None:
        super().__init__(identity=True, standardize="none")

    def extra_repr(self) -> str:
        return "Σ=I"


@PENALTIES.register("gn")
def gn() -> Penalty:
    """Gradient-norm regularization: ½‖∇ₓL‖₂² (SGR with Σ = I, Roth et al. 2018)."""
    return GN()


@PENALTIES.register("sgr")
def sgr(
    *,
    representation: str = "auto",
    source: str = "fgsm",
    eps: float = 0.1,
    attack_norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    pgd_steps: int = 10,
    pgd_rel_stepsize: float = 0.25,
    beta: float = 0.1,
    update_every: int | None = None,
    standardize: str = "data",
    centred: bool = True,
    radius_pixels: int | None = None,
    sigma_file: str | None = None,
    bn_policy: str = "eval",
) -> Penalty:
    """Structured gradient regularization (Roth et al. 2018): ½·gᵀΣg with Σ from adversarial perturbations."""
    return SGR(representation=representation, source=source, eps=eps, attack_norm=attack_norm, bounds=bounds,
               pgd_steps=pgd_steps, pgd_rel_stepsize=pgd_rel_stepsize, beta=beta, update_every=update_every,
               standardize=standardize, centred=centred, radius_pixels=radius_pixels, sigma_file=sigma_file,
               bn_policy=bn_policy)
