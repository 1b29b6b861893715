"""Batched prediction without gradients, in eval mode (mode restored afterwards)."""
from __future__ import annotations

import torch
from torch import nn

from .modes import run_mode


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels ``(N,)`` on ``x``'s device for ``x`` of any length, in chunks."""
    device = next(model.parameters()).device
    with run_mode(model, "eval"):
        return torch.cat([model(x[i:i + batch_size].to(device)).argmax(dim=1).to(x.device)
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500) -> float:
    """Fraction of ``x`` classified as ``y``."""
    if len(y) == 0:
        return float("nan")
    return float((predict(model, x, batch_size=batch_size) == y.to(x.device)).float().mean())
