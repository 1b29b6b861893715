"""The long-range-correlated (LRC) noise attack of the SGR paper, worst-of-k.

Roth, Lucchi, Nowozin, Hofmann, "Adversarially Robust Training through Structured Gradient
Regularization", arXiv 1805.08736 (2018), SPEC §3. The noise is ξ ~ N(0, Σ_LRC) with

    Cov(ξ[c, i], ξ[c', j]) = κ(c, c') · exp(−‖pos(i) − pos(j)‖₂ / ζ),   κ(c, c) = 1, κ(c, c') = 0.5,

ζ the decay length in pixels (the paper sweeps ζ ∈ {1, 2, 4, 8, 16}; our default is ζ = 4, the
middle of that grid **(our choice)**). Σ_LRC = κ ⊗ Σ_s is a
Kronecker product of the C×C channel matrix and the HW×HW spatial matrix (both positive
definite: κ has eigenvalues 1 + 0.5(C − 1) and 0.5, and exp(−r/ζ) is the Matérn-½ kernel), so
with Cholesky factors κ = L_c L_cᵀ and Σ_s = L_s L_sᵀ a sample is ξ = L_c Z L_sᵀ for a C×HW
standard normal Z. L_s is computed once per (shape, ζ, device, dtype) in float64 and cached;
its cost is O((HW)³), fine up to ~64×64 images.

x_adv = clip(x + ε·ξ) **(our choice: unit marginal variance, then ×ε, then clip to the
bounds)**. A point counts as robust only if all ``samples`` (k = 100) copies are classified
correctly.

.. warning:: ε is a noise *strength* (the marginal standard deviation), not a radius: ‖δ‖ can
   exceed ε in every norm. The attack says so (``eps_is_radius = False``) and the evaluation
   harness then checks the bounds only. ``project=True`` projects every copy onto the threat
   ball instead (not the paper's attack; the covariance is then no longer Σ_LRC).

Example::

    attack = make("lrc", zeta_px=4.0, samples=100)
    x_adv = attack(model, x, y, ThreatModel("l2", 0.3, (0.0, 1.0)))  # norm unused unless project=True
"""
from __future__ import annotations

import functools

import torch

from ..modes import BNPolicy
from ..threat import NORMS, ThreatModel
from . import ATTACKS
from .base import Labels
from .noise import NoiseAttack


def lrc_covariance(shape: tuple[int, int, int], *, zeta_px: float, inter_channel: float = 0.5,
                   dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The two Kronecker factors of Σ_LRC: channel matrix ``(C, C)`` and spatial ``(HW, HW)``."""
    c, h, w = shape
    if not zeta_px > 0:
        raise ValueError(f"zeta_px must be > 0, got {zeta_px}")
    rows, cols = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (HW, 2) pixel positions, row-major
    spatial = torch.exp(-torch.cdist(pos, pos) / zeta_px)  # (HW, HW)
    channel = torch.full((c, c), float(inter_channel), dtype=dtype)
    channel.fill_diagonal_(1.0)  # (C, C)
    return channel, spatial


@functools.lru_cache(maxsize=16)
def _factors(shape: tuple[int, int, int], zeta_px: float, inter_channel: float, device: str,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    channel, spatial = lrc_covariance(shape, zeta_px=zeta_px, inter_channel=inter_channel)
    eye = torch.eye(spatial.shape[0], dtype=spatial.dtype)
    l_s, info = torch.linalg.cholesky_ex(spatial)
    if int(info):  # numerically semi-definite for very long ζ: a tiny jitter restores definiteness
        l_s = torch.linalg.cholesky(spatial + 1e-10 * eye)
    l_c = torch.linalg.cholesky(channel)
    return l_c.to(device=device, dtype=dtype), l_s.to(device=device, dtype=dtype)


def lrc_noise(n: int, shape: tuple[int, int, int], *, zeta_px: float, inter_channel: float = 0.5,
              generator: torch.Generator | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` samples ``(n, C, H, W)`` of N(0, Σ_LRC), unit marginal variance.

    ``generator`` must live on ``device`` (random numbers are drawn where they are used: the
    k = 100 copies of a test set are too many to draw on the CPU and copy).
    """
    c, h, w = shape
    l_c, l_s = _factors(tuple(int(s) for s in shape), float(zeta_px), float(inter_channel), str(device), dtype)
    z = torch.randn((n, c, h * w), generator=generator, device=device, dtype=dtype)  # (n, C, HW)
    xi = torch.matmul(l_c, z)  # (n, C, HW): mixes channels
    xi = torch.matmul(xi, l_s.T)  # (n, C, HW): correlates pixels
    return xi.view(n, c, h, w)


class LRCNoise(NoiseAttack):
    """Worst-of-k long-range-correlated Gaussian noise (SGR paper, SPEC §3)."""

    def __init__(self, *, zeta_px: float = 4.0, inter_channel: float = 0.5, samples: int = 100,
                 project: bool = False, chunk_size: int = 4096, labels: Labels = "true",
                 bn_policy: BNPolicy = "eval", seed: int = 0) -> None:
        super().__init__(name="lrc", norms=NORMS, samples=samples, chunk_size=chunk_size, labels=labels,
                         bn_policy=bn_policy, seed=seed)
        if not zeta_px > 0:
            raise ValueError(f"zeta_px must be > 0, got {zeta_px}")
        self.zeta_px = float(zeta_px)
        self.inter_channel = float(inter_channel)
        self.project = bool(project)
        self.eps_is_radius = self.project

    def noise_generator(self, x: torch.Tensor) -> torch.Generator:
        return torch.Generator(device=x.device).manual_seed(self.seed)

    def sample(self, x: torch.Tensor, threat: ThreatModel, copies: int, generator: torch.Generator) -> torch.Tensor:
        m = x.shape[0]
        xi = lrc_noise(copies * m, tuple(x.shape[1:]), zeta_px=self.zeta_px, inter_channel=self.inter_channel,
                       generator=generator, device=x.device, dtype=x.dtype)  # (c·M, C, H, W)
        rep = x.expand(copies, *x.shape).flatten(0, 1)  # (c·M, C, H, W)
        x_noisy = rep + threat.eps * xi
        x_noisy = threat.project(rep, x_noisy) if self.project else threat.clip(x_noisy)
        return x_noisy.view(copies, *x.shape)


@ATTACKS.register("lrc")
def lrc(*, zeta_px: float = 4.0, inter_channel: float = 0.5, samples: int = 100, project: bool = False,
        chunk_size: int = 4096, labels: Labels = "true", bn_policy: BNPolicy = "eval", seed: int = 0) -> LRCNoise:
    """Long-range-correlated Gaussian noise (SGR paper), strength ε, decay ζ px, worst-of-k (k=100)."""
    return LRCNoise(zeta_px=zeta_px, inter_channel=inter_channel, samples=samples, project=project,
                    chunk_size=chunk_size, labels=labels, bn_policy=bn_policy, seed=seed)
