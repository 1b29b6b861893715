"""WideResNet (Zagoruyko & Komodakis, "Wide Residual Networks", 2016) and PreAct ResNet-18
(He et al., "Identity Mappings in Deep Residual Networks", 2016): the field's standard
architectures for adversarial robustness on CIFAR.

Parameter names follow the layout of RobustBench's model zoo, so a checkpoint saved from
one of its ``WideResNet``/``PreActResNet`` models loads with ``load_state_dict``:

- WideResNet-d-k: ``conv1``, ``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2[,convShortcut]}``,
  (``sub_block1`` with ``sub_block1=True``: an unused copy of ``block1`` that some published
  checkpoints carry), ``bn1``, ``fc``; n = (d − 4)/6 blocks per group, widths 16, 16k, 32k, 64k.
- PreAct ResNet-18: ``conv1``, ``layer{1..4}.{0,1}.{bn1,conv1,bn2,conv2[,shortcut.0]}``,
  optional ``bn`` before the classifier, ``linear``.

Input normalization is the buffers ``mu``/``sigma`` ((x − mu)/sigma, RobustBench's names),
so ε stays in pixel units. A checkpoint without them keeps the values the model was built
with (see :func:`gradreg.loading.load_state`).
"""
from __future__ import annotations

from typing import Any

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import MODELS


class _NormalizedNet(nn.Module):
    """Shared pieces: the (x − mu)/sigma buffers, the input check and auxiliary heads."""

    mu: torch.Tensor
    sigma: torch.Tensor
    aux_heads: nn.ModuleList

    def _setup(self, *, in_shape: tuple[int, int, int], num_classes: int, mean: Sequence[float] | None,
               std: Sequence[float] | None) -> None:
        c = in_shape[0]
        self.in_shape = tuple(int(s) for s in in_shape)
        self.num_classes = int(num_classes)
        self.register_buffer("mu", torch.tensor(list(mean) if mean is not None else [0.0] * c).view(1, -1, 1, 1))
        self.register_buffer("sigma", torch.tensor(list(std) if std is not None else [1.0] * c).view(1, -1, 1, 1))

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"{type(self).__name__} expects inputs of shape (N, {', '.join(map(str, self.in_shape))}), "
                             f"got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *, all_heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        self.check_input(x)
        z = self.features((x - self.mu) / self.sigma)  # (N, feature_dim)
        logits = self.classifier(z)  # (N, num_classes)
        if not all_heads:
            return logits
        return (logits, *(h(z) for h in self.aux_heads))

    def classifier(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


class WideBasicBlock(nn.Module):
    """BN–ReLU–conv3×3–BN–ReLU–conv3×3 with identity (or 1×1 conv on the pre-activated input
    when the width or stride changes) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = c_in == c_out and stride == 1
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)  # noqa: N815 - RobustBench's key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        # a changing block's shortcut sees the pre-activated input (the original WRN code's choice)
        return out + (x if self.equal_in_out else self.convShortcut(pre))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(_NormalizedNet):
    """WideResNet-depth-widen_factor for 32×32-like inputs, RobustBench key layout."""

    def __init__(self, *, depth: int = 28, widen_factor: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32),
                 num_classes: int = 10, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 sub_block1: bool = False, aux_classes: Sequence[int] = ()) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n ≥ 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be ≥ 1, got {widen_factor}")
        self._setup(in_shape=in_shape, num_classes=num_classes, mean=mean, std=std)
        n = (depth - 4) // 6
        w = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_shape[0], w[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, w[0], w[1], 1)
        if sub_block1:
            self.sub_block1 = NetworkBlock(n, w[0], w[1], 1)  # unused in forward; its weights load
        self.block2 = NetworkBlock(n, w[1], w[2], 2)
        self.block3 = NetworkBlock(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(w[3], num_classes)
        self.aux_heads = nn.ModuleList(nn.Linear(w[3], k) for k in aux_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)  # (N, 64k); = avg_pool(8) on 32×32 inputs

    def classifier(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z)


class PreActBlock(nn.Module):
    """BN–ReLU–conv3×3–BN–ReLU–conv3×3; the 1×1 shortcut (when needed) sees the raw input."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet18(_NormalizedNet):
    """PreAct ResNet-18 (4 stages of 2 blocks, widths w, 2w, 4w, 8w), RobustBench key layout."""

    def __init__(self, *, width: int = 64, in_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, bn_before_fc: bool = False,
                 aux_classes: Sequence[int] = ()) -> None:
        super().__init__()
        self._setup(in_shape=in_shape, num_classes=num_classes, mean=mean, std=std)
        self.bn_before_fc = bn_before_fc
        self.conv1 = nn.Conv2d(in_shape[0], width, 3, stride=1, padding=1, bias=False)
        c_in = width
        for i, (mult, stride) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
            c_out = width * mult
            setattr(self, f"layer{i}", nn.Sequential(PreActBlock(c_in, c_out, stride), PreActBlock(c_out, c_out, 1)))
            c_in = c_out
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(c_in)
        self.linear = nn.Linear(c_in, num_classes)
        self.aux_heads = nn.ModuleList(nn.Linear(c_in, k) for k in aux_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for i in range(1, 5):
            out = getattr(self, f"layer{i}")(out)
        if self.bn_before_fc:
            out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)  # (N, 8w); = avg_pool(4) on 32×32 inputs

    def classifier(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)


@MODELS.register("wrn")
def wrn(*, depth: int = 28, widen_factor: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
        sub_block1: bool = False, aux_classes: Sequence[int] = ()) -> WideResNet:
    """WideResNet-depth-widen_factor (any 6n+4 depth), RobustBench-compatible weights."""
    return WideResNet(depth=depth, widen_factor=widen_factor, in_shape=in_shape, num_classes=num_classes,
                      mean=mean, std=std, sub_block1=sub_block1, aux_classes=aux_classes)


@MODELS.register("wrn-28-10")
def wrn_28_10(**params: Any) -> WideResNet:
    """WideResNet-28-10 (depth/widen_factor overridable), RobustBench-compatible weights."""
    return WideResNet(**{"depth": 28, "widen_factor": 10, **params})


@MODELS.register("wrn-34-10")
def wrn_34_10(**params: Any) -> WideResNet:
    """WideResNet-34-10 (TRADES/Madry CIFAR model), RobustBench-compatible weights."""
    return WideResNet(**{"depth": 34, "widen_factor": 10, **params})


@MODELS.register("preact-resnet18")
def preact_resnet18(*, width: int = 64, in_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    bn_before_fc: bool = False, aux_classes: Sequence[int] = ()) -> PreActResNet18:
    """PreAct ResNet-18 (Wong et al. 2020's fast-AT model), RobustBench-compatible weights."""
    return PreActResNet18(width=width, in_shape=in_shape, num_classes=num_classes, mean=mean, std=std,
                          bn_before_fc=bn_before_fc, aux_classes=aux_classes)
