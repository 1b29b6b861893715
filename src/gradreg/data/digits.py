"""scikit-learn's 8×8 handwritten digits (1,797 images, shipped inside scikit-learn): the
embedded default data set. Pixels 0..16 scaled to [0, 1]; fixed stratified 80/20 split."""
from __future__ import annotations

import functools

import numpy as np
import torch

from . import DATASETS
from .base import DataBundle, stratified_split

SPLIT_SEED = 0  # fixed: the split is part of the data set's definition


@functools.cache
def _arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images ``(1797, 1, 8, 8)`` in [0, 1], labels and the split, read once per process (never
    handed out: every bundle gets its own tensors)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (raw.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = raw.target.astype(np.int64)
    tr, te = stratified_split(y, test_fraction=0.2, seed=SPLIT_SEED)
    return x, y, tr, te


@DATASETS.register("digits")
def digits(*, data_dir: str | None = None, download: bool = False) -> DataBundle:
    """scikit-learn digits, 8×8 grey, 1,437 train / 360 test (stratified 80/20), embedded."""
    x, y, tr, te = _arrays()  # fancy indexing below copies: the cached arrays are never shared
    return DataBundle(
        name="digits",
        train_x=torch.from_numpy(x[tr]), train_y=torch.from_numpy(y[tr]),
        test_x=torch.from_numpy(x[te]), test_y=torch.from_numpy(y[te]),
        num_classes=10, bounds=(0.0, 1.0),  # pixel counts 0..16 divided by 16 in _arrays
    )
