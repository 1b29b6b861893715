"""LRC curves: accuracy under worst-of-k long-range-correlated (or data-covariance) noise per
decay length and strength, and the data statistics that scale that noise."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .. import attacks
from ..attacks.lrc import covariance_factor, data_covariance, mean_marginal_variance
from ..data import DataBundle
from ..judge import robust_accuracy
from ..threat import ThreatModel
from .settings import EvalSettings, test_subset

def lrc_curves(model: nn.Module, bundle: DataBundle, *, zetas: Sequence[float], eps: Sequence[float],
               samples: int = 100, settings: EvalSettings | None = None,
               marginal_std: float = 1.0) -> dict[float, list[float]]:
    """Accuracy under worst-of-``samples`` LRC noise for every decay length ζ (pixels) and strength ε.

    ``marginal_std`` scales the unit-variance noise (x + ε·s·ξ); :func:`lrc_data_std` gives the
    data-standardized s."""
    settings = settings or EvalSettings()
    x, y = test_subset(bundle, settings.n_test)
    threat = ThreatModel("l2", 0.0, bundle.bounds)  # strength, not a radius: only the bounds apply
    out = {}
    for zeta in zetas:
        attack = attacks.make("lrc", zeta_px=zeta, samples=samples, marginal_std=marginal_std,
                              labels=settings.labels, seed=settings.seed)
        out[float(zeta)] = robust_accuracy(model, x, y, attack, threat, list(eps), batch_size=settings.batch_size)
    return out


def lrc_covariance_curve(model: nn.Module, bundle: DataBundle, *, factor: torch.Tensor, eps: Sequence[float],
                         samples: int = 100, settings: EvalSettings | None = None) -> list[float]:
    """Accuracy per strength ε under worst-of-``samples`` Gaussian noise N(0, F·Fᵀ) — with
    ``factor = lrc_data_factor(bundle)`` the data covariance used as Σ_LRC."""
    settings = settings or EvalSettings()
    x, y = test_subset(bundle, settings.n_test)
    threat = ThreatModel("l2", 0.0, bundle.bounds)
    attack = attacks.make("lrc", factor=factor, samples=samples, labels=settings.labels, seed=settings.seed)
    return robust_accuracy(model, x, y, attack, threat, list(eps), batch_size=settings.batch_size)


def lrc_data_std(bundle: DataBundle) -> float:
    """σ_data: the square root of the training inputs' mean per-pixel variance."""
    return math.sqrt(mean_marginal_variance(bundle.train_x))


def lrc_data_factor(bundle: DataBundle) -> torch.Tensor:
    """F ``(d, d)`` with F·Fᵀ = the covariance of the training inputs (d×d: 3072² for CIFAR)."""
    return covariance_factor(data_covariance(bundle.train_x))
