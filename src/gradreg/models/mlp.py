"""A fully connected ReLU network; small inputs and quick experiments."""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from . import MODELS
from .base import Classifier


@MODELS.register("mlp")
def mlp(
    *,
    in_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    hidden: Sequence[int] = (256, 256),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    aux_classes: Sequence[int] = (),
) -> Classifier:
    """Multi-layer perceptron with ReLU hidden layers (default 256-256)."""
    layers: list[nn.Module] = [nn.Flatten()]  # (N, C·H·W)
    width = math.prod(in_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return Classifier(nn.Sequential(*layers), width, in_shape=in_shape, num_classes=num_classes, mean=mean,
                      std=std, aux_classes=aux_classes)
