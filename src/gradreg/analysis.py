"""Perturbation analysis (SGR paper, SPEC §3): the covariance function of a model's PGD
perturbations and its decay length next to the data's, and the softmax along the straight
line from a clean input to its adversarial example (a smoothness picture)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .data import DataBundle
from .harness import EvalSettings, craft, test_subset
from .modes import run_mode
from .penalties.sgr import covfun_second_moment
from .threat import ThreatModel


def decay_length(values: torch.Tensor | list[float]) -> float | None:
    """Displacement (pixels) where a covariance function first falls to 1/e of its value at 0,
    by linear interpolation between neighbouring integer displacements; None if it never does."""
    v = [float(a) for a in values]
    if not v or v[0] <= 0:
        return None
    target = v[0] / math.e
    for r in range(1, len(v)):
        if v[r] <= target:
            return (r - 1) + (v[r - 1] - target) / (v[r - 1] - v[r])
    return None


@dataclass
class CovarianceAnalysis:
    eps: float
    perturbation: list[float]  # within-channel covariance function of ξ = x_adv − x, by displacement
    data: list[float]  # within-channel covariance function of the centred test inputs
    perturbation_decay: float | None
    data_decay: float | None


def perturbation_covariance(model: nn.Module, bundle: DataBundle, settings: EvalSettings, *,
                            eps: float) -> tuple[CovarianceAnalysis, torch.Tensor, torch.Tensor]:
    """PGD perturbations of the test set at radius ``eps`` and their covariance function.
    Returns the analysis and the (clean, adversarial) inputs for further plots."""
    x, y = test_subset(bundle, settings.n_test)
    threat = ThreatModel(settings.norm, 0.0, bundle.bounds)
    x_adv = craft(model, x, y, settings.make_attack("pgd"), threat, [eps], batch_size=settings.batch_size)[0]
    xi = (x_adv - x).double()  # (N, C, H, W)
    intra_xi, _ = covfun_second_moment(xi)
    centred = (x - x.mean(dim=0, keepdim=True)).double()
    intra_x, _ = covfun_second_moment(centred)
    analysis = CovarianceAnalysis(eps=eps, perturbation=intra_xi.tolist(), data=intra_x.tolist(),
                                  perturbation_decay=decay_length(intra_xi), data_decay=decay_length(intra_x))
    return analysis, x, x_adv


@torch.no_grad()
def softmax_along_line(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, *, points: int = 41) -> torch.Tensor:
    """p(x + t·(x_adv − x)) for t in [0, 1]: ``(points, N, K)``, model in eval mode."""
    dev = next(model.parameters()).device
    ts = torch.linspace(0, 1, points)
    with run_mode(model, "eval"):
        return torch.stack([torch.softmax(model((x + t * (x_adv - x)).to(dev)), dim=1).cpu() for t in ts])
