"""Shared model pieces: input normalization, the feature/head split, auxiliary heads."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x − mean) / std per channel; lives inside the model so attacks see raw pixels."""

    mode_free = True  # the same in train and eval mode (gradreg.modes.mode_invariant)
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """normalize → features → head. Optional auxiliary heads share the features (used by the
    multi-task DataGrad variant); ``forward`` returns the main logits only, so attacks and
    evaluation never see the auxiliary outputs.
    """

    mode_free = True  # its own forward ignores the mode; its children decide (modes.mode_invariant)

    def __init__(
        self,
        features: nn.Module,
        feature_dim: int,
        *,
        in_shape: tuple[int, int, int],
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        aux_classes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        c = in_shape[0]
        self.in_shape = tuple(int(s) for s in in_shape)
        self.num_classes = int(num_classes)
        self.normalize = Normalize(mean if mean is not None else [0.0] * c, std if std is not None else [1.0] * c)
        self.features = features
        self.head = nn.Linear(feature_dim, num_classes)
        self.aux_heads = nn.ModuleList(nn.Linear(feature_dim, k) for k in aux_classes)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (N, {', '.join(map(str, self.in_shape))}), "
                f"got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor, *, all_heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        self.check_input(x)
        z = self.features(self.normalize(x))  # (N, feature_dim)
        logits = self.head(z)  # (N, num_classes)
        if not all_heads:
            return logits
        return (logits, *(h(z) for h in self.aux_heads))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def num_heads(model: nn.Module) -> int:
    inner = unwrap(model)
    return 1 + len(getattr(inner, "aux_heads", ()))


def forward_all(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Logits of every head, main head first. Goes through ``model.__call__`` so DDP hooks run."""
    if num_heads(model) == 1:
        return (model(x),)
    return tuple(model(x, all_heads=True))
