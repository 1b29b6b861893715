"""The Carlini–Wagner CNN (Carlini & Wagner, "Towards Evaluating the Robustness of Neural
Networks", 2017), the default architecture of the SGR paper (Roth et al., 2018; SPEC §3):

Conv(p0)–ReLU–Conv(p1)–ReLU–MaxPool2–Conv(p2)–ReLU–Conv(p3)–ReLU–MaxPool2–Dense(p4)–ReLU–
Dense(p5)–ReLU–Dense(classes), 3×3 "valid" convolutions, stride 1.

MNIST widths p = [32, 32, 64, 64, 200, 200]; CIFAR-10 widths [64, 64, 128, 128, 256, 256].
For inputs smaller than 28×28 (the 8×8 digits) the convolutions are padded ("same") so two
pools still leave a 2×2 map — our choice, not the paper's.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from . import MODELS
from .base import Classifier

MNIST_WIDTHS = (32, 32, 64, 64, 200, 200)
CIFAR_WIDTHS = (64, 64, 128, 128, 256, 256)


def _spatial_after(size: int, pad: int) -> int:
    for _ in range(2):
        size = size + 2 * pad - 2  # 3×3 conv
        size = size + 2 * pad - 2
        size //= 2  # max-pool 2
    return size


@MODELS.register("cw")
def cw(
    *,
    in_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    widths: Sequence[int] | None = None,
    padded: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    aux_classes: Sequence[int] = (),
) -> Classifier:
    """Carlini–Wagner CNN (SGR paper's default); widths follow the input's channel count."""
    c, h, w = in_shape
    p = tuple(widths) if widths is not None else (CIFAR_WIDTHS if c == 3 else MNIST_WIDTHS)
    if len(p) != 6:
        raise ValueError(f"cw needs 6 widths, got {p}")
    if padded is None:
        padded = min(h, w) < 28
    pad = 1 if padded else 0
    side_h, side_w = _spatial_after(h, pad), _spatial_after(w, pad)
    if side_h < 1 or side_w < 1:
        raise ValueError(f"input {in_shape} is too small for the cw model (try padded=True)")
    features = nn.Sequential(
        nn.Conv2d(c, p[0], 3, padding=pad), nn.ReLU(),
        nn.Conv2d(p[0], p[1], 3, padding=pad), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(p[1], p[2], 3, padding=pad), nn.ReLU(),
        nn.Conv2d(p[2], p[3], 3, padding=pad), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),  # (N, p3·side_h·side_w)
        nn.Linear(p[3] * side_h * side_w, p[4]), nn.ReLU(),
        nn.Linear(p[4], p[5]), nn.ReLU(),
    )
    return Classifier(features, p[5], in_shape=in_shape, num_classes=num_classes, mean=mean, std=std,
                      aux_classes=aux_classes)
