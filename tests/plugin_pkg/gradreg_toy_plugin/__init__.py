"""A toy gradreg plugin: one model, one data set, one attack (factories) and one penalty (a
module that registers itself)."""
from __future__ import annotations

import torch


def toy_mlp(*, in_shape=(1, 4, 4), num_classes=2, mean=None, std=None, aux_classes=(), hidden=8):  # type: ignore[no-untyped-def]
    """Toy MLP from a plugin."""
    from gradreg import models

    return models.make("mlp", in_shape=in_shape, num_classes=num_classes, hidden=(hidden,), mean=mean, std=std,
                       aux_classes=aux_classes)


def toy_blobs(*, data_dir=None, download=False):  # type: ignore[no-untyped-def]
    """Two Gaussian blobs of 4×4 grey images."""
    from gradreg.data import DataBundle

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(80) % 2
    x = (0.3 + 0.4 * y.float().view(-1, 1, 1, 1) + 0.1 * torch.randn(80, 1, 4, 4, generator=gen)).clamp(0, 1)
    return DataBundle(name="toy-blobs", train_x=x[:64], train_y=y[:64], test_x=x[64:], test_y=y[64:], num_classes=2,
                      bounds=(0.0, 1.0))  # clamped to [0, 1] above


def toy_fgsm(*, labels="true"):  # type: ignore[no-untyped-def]
    """FGSM under a plugin's name."""
    from gradreg import attacks

    return attacks.make("fgsm", labels=labels)
