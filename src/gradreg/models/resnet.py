"""ResNet-18 in its CIFAR form (He et al., 2016; the variant of Madry et al. and TRADES):
3×3 stem with stride 1 and no max-pool, four stages of two BasicBlocks (64, 128, 256, 512)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import MODELS
from .base import Classifier


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@MODELS.register("resnet18")
def resnet18(
    *,
    in_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    width: int = 64,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    aux_classes: Sequence[int] = (),
) -> Classifier:
    """ResNet-18, CIFAR variant (3×3 stem, no max-pool), BatchNorm."""
    c = in_shape[0]
    layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    c_in = width
    for stage, stride in zip((1, 2, 4, 8), (1, 2, 2, 2)):
        c_out = width * stage
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]  # (N, 8·width)
    return Classifier(nn.Sequential(*layers), c_in, in_shape=in_shape, num_classes=num_classes, mean=mean, std=std,
                      aux_classes=aux_classes)
