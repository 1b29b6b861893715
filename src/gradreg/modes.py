"""Train/eval mode handling with an explicit BatchNorm policy.

Every attack and every extra pass of a penalty runs inside :func:`run_mode`, which restores
the mode of *each* submodule it found (also on error) and can keep BatchNorm's running
statistics untouched by adversarial or perturbed inputs.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

BNPolicy = Literal["eval", "train", "frozen"]
BN_POLICIES: tuple[str, ...] = ("eval", "train", "frozen")
"""``eval``: whole model in eval mode (running statistics used, never updated) — the default for
attacks and power iterations. ``train``: train mode, BatchNorm updates its running statistics.
``frozen``: train mode (batch statistics, dropout on) but running statistics are restored
afterwards, so perturbed inputs never leak into them."""


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def run_mode(model: nn.Module, policy: BNPolicy = "eval") -> Iterator[nn.Module]:
    """Run ``model`` under ``policy`` and restore every submodule's mode (and, for ``frozen``,
    BatchNorm buffers) on exit, even when the body raises."""
    if policy not in BN_POLICIES:
        raise ValueError(f"unknown BatchNorm policy {policy!r}; use one of {BN_POLICIES}")
    saved_modes = [(m, m.training) for m in model.modules()]
    saved_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    if policy == "frozen":
        for bn in _bn_modules(model):
            for buf in (bn.running_mean, bn.running_var, bn.num_batches_tracked):
                if buf is not None:
                    saved_buffers.append((buf, buf.detach().clone()))
    try:
        model.train(policy != "eval")
        yield model
    finally:
        with torch.no_grad():
            for buf, copy in saved_buffers:
                buf.copy_(copy)
        for m, was_training in saved_modes:
            m.training = was_training
