"""Model registry. Every model is a plain ``torch.nn.Module`` that returns logits.

Input normalization is the model's first layer, so ε and bounds are always in the units of
the data as loaded (pixels in [0, 1]).
"""
from __future__ import annotations

from torch import nn

from ..registry import Registry
from .base import Classifier, Normalize, forward_all, num_heads, unwrap

MODELS: Registry[nn.Module] = Registry("model", entry_point_group="gradreg.models")

from . import cw, mlp, resnet, wide_resnet  # noqa: E402,F401  (registration side effects)


def make(name: str, **params: object) -> nn.Module:
    """Build a registered model: ``make("cw", in_shape=(1, 28, 28), num_classes=10)``."""
    return MODELS.make(name, **params)


def auto_name(data_name: str, in_shape: tuple[int, int, int]) -> str:
    """The model ``auto`` resolves to (our choice): ResNet-18 for CIFAR-sized colour images,
    the C&W CNN otherwise (its padded variant for inputs smaller than 28×28)."""
    c, h, w = in_shape
    if c == 3 and h >= 32:
        return "resnet18"
    return "cw"


__all__ = ["MODELS", "Classifier", "Normalize", "make", "auto_name", "forward_all", "num_heads", "unwrap"]
