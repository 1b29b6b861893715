"""A validation split carved from the training split, for tuning without the test set.

``carve_validation(source, fraction=0.2)`` returns a training source
(:class:`~gradreg.data.source.TrainSource`, in memory or streamed alike) whose training rows are
the rest of the training split and whose held-out part is the validation part. It reads only
training rows: the test split is dropped unread, so a tuned hyper-parameter can never have
seen it. The split is class-stratified with a fixed seed
(:data:`VALIDATION_SEED`, our choice), independent of the training seed, so every run of a
sweep scores the same validation points.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .base import stratified_split
from .source import TrainSource

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


def carve_validation(source: TrainSource, *, fraction: float) -> TrainSource:
    """Split ``source``'s training rows into (train, validation); validation plays the test part.

    The validation rows are read into memory (:meth:`TrainSource.read`); the rest stay where
    they were (indexed tensors, or the streamed Dataset's subset). The normalization statistics
    (``mean``/``std``) are kept: they come from the training split only. Raises ``ValueError``
    as :func:`validation_indices`.
    """
    tr, va = validation_indices(source.train_y, fraction=fraction)
    val_x, val_y = source.read(torch.as_tensor(va))
    rest = torch.as_tensor(tr)
    return replace(source, name=f"{source.name}[validation {fraction:g}]", rows=source.rows.subset(rest),
                   train_y=source.train_y[rest], held_out=lambda: (val_x, val_y))
