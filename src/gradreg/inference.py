"""Prediction and clean accuracy: the one ``predict`` and the one ``accuracy`` that attacks,
the judge, the protocols and the training loop all use."""
from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn

from . import distributed
from .devices import comm_device
from .modes import run_mode


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int | None = None,
            eval_mode: bool = False) -> torch.Tensor:
    """Predicted classes ``(N,)`` on ``x``'s device, in chunks of ``batch_size`` (all at once
    by default; chunks move to the model's device, results to ``x``'s). ``eval_mode=False`` keeps the model's
    *current* mode (an attack has already set its BatchNorm policy); ``True`` switches to eval
    mode and restores every submodule's mode afterwards."""
    if len(x) == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    # a parameter-free model runs where its input is
    device = next(itertools.chain(model.parameters(), model.buffers()), x).device
    step = len(x) if batch_size is None else batch_size
    with run_mode(model, "eval") if eval_mode else contextlib.nullcontext():
        return torch.cat([model(x[i:i + step].to(device)).argmax(dim=1).to(x.device)
                          for i in range(0, len(x), step)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500) -> float:
    """Fraction of ``x`` classified as ``y`` in eval mode (mode restored). Under
    torch.distributed each rank scores its shard and the counts are summed, so every rank
    returns the same number."""
    if len(y) == 0:
        return float("nan")
    part = distributed.shard(len(y))
    hits = predict(model, x[part], batch_size=batch_size, eval_mode=True) == y[part].to(x.device)
    correct = hits.sum().to(torch.float64).reshape(1)
    return float(distributed.all_reduce_sum_(correct.to(comm_device(x.device)))) / len(y)
