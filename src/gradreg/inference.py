"""Batched prediction without gradients, in eval mode (mode restored afterwards)."""
from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .modes import run_mode


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels ``(N,)`` on ``x``'s device for ``x`` of any length, in chunks."""
    device = next(model.parameters()).device
    with run_mode(model, "eval"):
        return torch.cat([model(x[i:i + batch_size].to(device)).argmax(dim=1).to(x.device)
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500) -> float:
    """Fraction of ``x`` classified as ``y``. Under torch.distributed each rank scores its shard
    and the counts are summed, so every rank returns the same number."""
    if len(y) == 0:
        return float("nan")
    part = distributed.shard(len(y))
    correct = (predict(model, x[part], batch_size=batch_size) == y[part].to(x.device)).sum().to(torch.float64)
    return float(distributed.all_reduce_sum_(correct.reshape(1).to(_reduce_device(x)))) / len(y)


def _reduce_device(x: torch.Tensor) -> torch.device:
    # gloo reduces CPU tensors, nccl CUDA tensors
    return x.device if x.device.type == "cuda" else torch.device("cpu")
