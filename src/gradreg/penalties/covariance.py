"""Covariance matrices of input perturbations for structured gradient regularization (SPEC §3).

Three representations of a (raw, uncentred) second-moment matrix Σ of perturbations ξ, each
with ``matvec`` (Σg), ``quadratic`` (gᵀΣg per sample), ``mean_diag``, an EMA ``update`` from a
batch of perturbations, and ``set_fixed`` from a file (:func:`load_sigma_file`):

- :class:`IdentityCovariance`: Σ = I (GN);
- :class:`FullCovariance`: an explicit d×d matrix, for small inputs;
- :class:`CovFunCovariance`: a stationary covariance function of rounded pixel displacement,
  within and between channels, [Σ]_{(c,p),(c',q)} = K_{cc'}(round‖p − q‖₂), estimated by
  averaging ξ_a·ξ_b over all ordered pixel pairs at each rounded displacement (from the FFT
  autocorrelation of ξ, O(d log d)) and applied as a correlation through the FFT on a grid
  padded to 2H×2W (no wrap-around).

**Positive semi-definite by construction** (our choice of repair): neither normalizing each
displacement bin by its own pair count nor pooling displacements by rounded radius keeps a
covariance-function estimate PSD (spatially correlated 28×28 perturbations gave eigenvalues
down to −1.4 % of the largest), and a Σ with negative eigenvalues lets Ω_Σ = ½gᵀΣg go
negative, rewarding the gradients it should penalize. So ``covfun`` applies Σ through the
eigenvalues of its circulant embedding on the 2H×2W grid, clamped at 0: per frequency ω the
channel-contrast eigenvalue K̂_intra(ω) − K̂_inter(ω) and the channel-sum eigenvalue
K̂_intra(ω) + (C−1)·K̂_inter(ω). The Σ used is the principal H×W submatrix of that PSD
circulant, hence PSD; where the estimate was PSD already, it is unchanged. ``full`` matrices
are PSD as averages of ξξᵀ; a matrix read from a file or built from (possibly truncated)
covariance functions is projected onto the PSD cone once, by clamping its eigenvalues at 0.
``mean_diag`` is that of the Σ actually used.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

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


def psd_projection(sigma: torch.Tensor) -> torch.Tensor:
    """The nearest PSD matrix in Frobenius norm: the symmetric part with its negative
    eigenvalues set to 0 (computed in float64)."""
    sym = 0.5 * (sigma.double() + sigma.double().T)
    evals, evecs = torch.linalg.eigh(sym)
    return ((evecs * evals.clamp_min(0)) @ evecs.T).to(sigma.dtype)


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

    sigma: torch.Tensor

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
        else:
            n = max_displacement_bin(*in_shape[1:]) + 1
            intra = _fit_length(fixed["cov_intra"], n)
            inter = _fit_length(fixed.get("cov_inter", torch.zeros(n, dtype=torch.float64)), n)
            s = matrix_from_covfun(intra, inter, in_shape, self.radius_pixels)
        # only the symmetric part enters a quadratic form; a file's matrix or a truncated
        # function need not be PSD (module doc)
        self.sigma.copy_(psd_projection(s).to(self.sigma))


class CovFunCovariance(Covariance):
    """A stationary covariance function of rounded pixel displacement (within and between
    channels), applied as a correlation through the FFT. Memory O(d), never d×d."""

    cov_intra: torch.Tensor
    cov_inter: torch.Tensor
    _bins: torch.Tensor
    _support: torch.Tensor

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

    def spectra(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The PSD Σ per frequency ω, each ``(2H, W+1)``: (Σĝ)_c = a(ω)·ĝ_c + b(ω)·Σ_c' ĝ_c', with
        a = max(K̂_intra − K̂_inter, 0) (the channel-contrast eigenvalue) and b such that
        a + C·b = max(K̂_intra + (C−1)·K̂_inter, 0) (the channel-sum eigenvalue): the
        eigenvalues of the circulant embedding clamped at 0 (module doc)."""
        c = self.in_shape[0]
        k_intra = self._spectrum(self.cov_intra, dtype)
        k_inter = self._spectrum(self.cov_inter, dtype)
        a = (k_intra - k_inter).clamp_min(0)
        if c == 1:
            return a, torch.zeros_like(a)
        total = (k_intra + (c - 1) * k_inter).clamp_min(0)
        return a, (total - a) / c

    def matvec(self, g: torch.Tensor) -> torch.Tensor:
        _, h, w = self.in_shape
        spec_g = torch.fft.rfft2(g, s=(2 * h, 2 * w))  # (N, C, 2H, W+1)
        a, b = self.spectra(g.dtype)
        out = a * spec_g + b * spec_g.sum(dim=1, keepdim=True)
        return torch.fft.irfft2(out, s=(2 * h, 2 * w))[..., :h, :w]  # (N, C, H, W)

    def quadratic(self, g: torch.Tensor) -> torch.Tensor:
        """gᵀΣg by Parseval, one forward FFT and no inverse (the training-time path):
        gᵀ(K ⋆ g) = (1/P)·Σ_ω K̂(ω)·|ĝ(ω)|² on the P-point padded grid; the half spectrum of
        rfft2 counts every column twice except the 0th and the Nyquist one."""
        _, h, w = self.in_shape
        spec_g = torch.fft.rfft2(g, s=(2 * h, 2 * w))  # (N, C, 2H, W+1)
        a, b = self.spectra(g.dtype)
        weight = torch.full((w + 1,), 2.0, dtype=g.dtype, device=g.device)
        weight[0] = weight[w] = 1.0
        per_freq = a * _abs2(spec_g).sum(dim=1) + b * _abs2(spec_g.sum(dim=1))  # (N, 2H, W+1)
        return (per_freq * weight).sum(dim=(1, 2)) / (4 * h * w)

    def mean_diag(self) -> torch.Tensor:
        """The diagonal of the Σ used (every entry is the same): the kernel a + b at δ = 0."""
        _, h, w = self.in_shape
        a, b = self.spectra(self.cov_intra.dtype)
        return torch.fft.irfft2(a + b, s=(2 * h, 2 * w))[0, 0]

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


