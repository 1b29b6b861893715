"""Models defined outside gradreg (not registered), loaded with ``--model byo_nets:...``."""
from __future__ import annotations

import torch
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


class PairsDataset(torch.utils.data.Dataset):
    """A user's map-style Dataset of (image, label) pairs: 4 classes of 6×6 grey squares
    whose brightness encodes the class."""

    classes = ("a", "b", "c", "d")

    def __init__(self, n: int = 40, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 4
        self.x = (self.y.float().view(-1, 1, 1, 1) / 4 + 0.2 * torch.rand(n, 1, 6, 6, generator=gen)).clamp(0, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def pairs() -> PairsDataset:
    return PairsDataset()


def pairs_split() -> tuple[PairsDataset, PairsDataset]:
    return PairsDataset(40, seed=0), PairsDataset(12, seed=1)


def not_data() -> int:
    return 3


class DigitsItems(torch.utils.data.Dataset):
    """One split of gradreg's digits as a user's map-style Dataset of (1×8×8 image, label)
    items, read one at a time (no ``targets``: gradreg finds the labels itself)."""

    def __init__(self, split: str) -> None:
        from gradreg import data

        bundle = data.load("digits")
        self.x = bundle.train_x if split == "train" else bundle.test_x
        self.y = bundle.train_y if split == "train" else bundle.test_y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def digits_pair() -> tuple[DigitsItems, DigitsItems]:
    return DigitsItems("train"), DigitsItems("test")
