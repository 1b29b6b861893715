"""Models defined outside gradreg (not registered), loaded with ``--model byo_nets:...``."""
from __future__ import annotations

from torch import nn


class SmallBNNet(nn.Module):
    """Conv–BatchNorm–ReLU ×2 → linear; a user's own architecture."""

    def __init__(self, channels: int = 1, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.fc(self.body(x))


def small_bn_net(width: int = 8) -> SmallBNNet:
    return SmallBNNet(width=width)
