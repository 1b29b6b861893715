"""The data bundle and the fixed stratified split shared by every loader."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class DataBundle:
    """Train and test tensors of one data set.

    ``*_x``: float32 ``(N, C, H, W)`` in ``bounds``; ``*_y``: int64 ``(N,)``.
    ``bounds``: the input range ``(lo, hi)`` of the data, which ε, attacks and augmentation
    padding are measured against. It has no default: each loader states the range its conversion
    produces (e.g. uint8 pixels divided by 255 lie in [0, 1]), so no box is assumed for data
    that do not say. ``mean``/``std`` are per-channel statistics of the training split, for the
    model's normalization layer.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    bounds: tuple[float, float]
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    classes: tuple[str, ...] = field(default=())
    augment_kind: str = "none"  # "none" | "crop" | "crop-flip": what --augment means for this set

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dim() != 4:
                raise ValueError(f"{self.name}: {split} images must be (N, C, H, W), got {tuple(x.shape)}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: {split} labels must be ({x.shape[0]},), got {tuple(y.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{self.name}: {split} labels out of range [0, {self.num_classes})")
            if x.numel() and (float(x.min()) < self.bounds[0] or float(x.max()) > self.bounds[1]):
                raise ValueError(f"{self.name}: {split} images have values in [{float(x.min()):g}, {float(x.max()):g}], "
                                 f"outside the data set's bounds {self.bounds} (normalization belongs in the model)")
            if not torch.isfinite(x).all():
                raise ValueError(f"{self.name}: {split} images contain NaN or infinite values")
        if not self.mean:
            dims = (0, 2, 3)
            self.mean = tuple(float(v) for v in self.train_x.mean(dim=dims))
            self.std = tuple(max(float(v), 1e-6) for v in self.train_x.std(dim=dims))
        if not self.classes:
            self.classes = tuple(str(i) for i in range(self.num_classes))

    @property
    def in_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def summary(self) -> str:
        c, h, w = self.in_shape
        return (f"{self.name}: {len(self.train_y)} train / {len(self.test_y)} test, {c}×{h}×{w}, "
                f"{self.num_classes} classes, bounds {self.bounds}")


def stratified_split(y: np.ndarray, *, test_fraction: float | None = None, test_size: int | None = None,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed class-stratified split of indices ``0..len(y)-1`` into (train, test), both sorted.

    Uses scikit-learn's ``train_test_split`` with ``stratify=y`` and a fixed ``random_state``,
    so the same labels and seed always give the same split on every machine.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    size = test_size if test_size is not None else test_fraction
    train_idx, test_idx = train_test_split(idx, test_size=size, stratify=y, random_state=seed, shuffle=True)
    return np.sort(train_idx), np.sort(test_idx)
