"""A validation split carved from the training split, for tuning without the test set.

``carve_validation(bundle, fraction=0.2)`` returns a bundle whose *train* part is the rest of
the training split and whose *test* part is the held-out validation part. It reads only
``bundle.train_x``/``bundle.train_y``: the test split is dropped unread, so a tuned
hyper-parameter can never have seen it. The split is class-stratified with a fixed seed
(:data:`VALIDATION_SEED`, our choice), independent of the training seed, so every run of a
sweep scores the same validation points.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import DataBundle, stratified_split

VALIDATION_SEED = 0  # fixed (our choice): all runs of a sweep share one validation split


def validation_indices(train_y: torch.Tensor, *, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(rest, validation) row indices of the training split: class-stratified, seed
    :data:`VALIDATION_SEED`. Raises ``ValueError`` for a fraction outside (0, 1) or one that
    leaves a class empty."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    try:
        return stratified_split(train_y.numpy(), test_fraction=fraction, seed=VALIDATION_SEED)
    except ValueError as err:
        raise ValueError(f"cannot carve a {fraction:g} validation split from {len(train_y)} training points: {err}") from None


def carve_validation(bundle: DataBundle, *, fraction: float) -> DataBundle:
    """Split ``bundle``'s training part into (train, validation); validation plays the test part.

    The normalization statistics (``mean``/``std``) are kept: they come from the training split
    only. Raises ``ValueError`` as :func:`validation_indices`.
    """
    x, y = bundle.train_x, bundle.train_y
    tr, va = validation_indices(y, fraction=fraction)
    return DataBundle(
        name=f"{bundle.name}[validation {fraction:g}]",
        train_x=x[tr], train_y=y[tr], test_x=x[va], test_y=y[va],
        num_classes=bundle.num_classes, bounds=bundle.bounds, mean=bundle.mean, std=bundle.std,
        classes=bundle.classes, augment_kind=bundle.augment_kind,
    )
