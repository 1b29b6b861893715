"""Norms of input-gradient batches with derivatives that stay finite at zero (shared by
DataGrad, Lyu and SGR)."""
from __future__ import annotations

import torch

_TINY = 1e-30


def safe_l2(g: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖g_i‖₂ ``(N, ...) -> (N,)`` whose first and second derivatives are finite
    (zero) at g_i = 0, so a model that ignores its input gives no NaN under double backprop."""
    sq = g.flatten(1).pow(2).sum(dim=1)
    return torch.where(sq > 0, sq.clamp_min(_TINY).sqrt(), torch.zeros_like(sq))


def grad_norm(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of a gradient batch: ``l1``, ``l2``, ``linf`` or ``sq`` (½‖g‖₂²); ``(N,)``."""
    flat = g.flatten(1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    if norm == "l2":
        return safe_l2(g)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "sq":
        return 0.5 * flat.pow(2).sum(dim=1)
    raise ValueError(f"unknown gradient norm {norm!r}")
