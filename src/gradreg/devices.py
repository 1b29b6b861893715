"""Where tensors live: the device a user names, the device a model is on, and the device a
collective reduces on. The one place that knows device names (``auto``, ``cpu``, ``cuda``,
``cuda:N``, ``mps``)."""
from __future__ import annotations

import torch
from torch import nn

from . import distributed

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(name: str) -> torch.device:
    """``auto``: this rank's CUDA device when there is one, else the CPU; ``cuda``/``cuda:N``
    checked against the GPUs present (one-line ``ValueError`` otherwise)."""
    if name.startswith("cuda:"):
        try:
            index = int(name.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"unknown device {name!r}; use {', '.join(DEVICE_NAMES)}") from None
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but {torch.cuda.device_count()} CUDA device(s) are available")
        return torch.device(name)
    if name not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; use {', '.join(DEVICE_NAMES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    if name in ("auto", "cuda"):
        return distributed.local_device() if name == "cuda" or torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameter-free model)."""
    for p in model.parameters():
        return p.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def comm_device(device: torch.device) -> torch.device:
    """Where a collective over tensors from ``device`` runs: gloo reduces CPU tensors, nccl
    CUDA tensors."""
    return device if device.type == "cuda" else torch.device("cpu")
