"""Train/eval mode handling with an explicit BatchNorm policy.

Every attack and every extra pass of a penalty runs inside :func:`run_mode`, which restores
the mode of *each* submodule it found (also on error) and can keep BatchNorm's running
statistics untouched by adversarial or perturbed inputs.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, cast

from torch import nn

BNPolicy = Literal["eval", "train", "frozen"]
BN_POLICIES: tuple[str, ...] = ("eval", "train", "frozen")
"""``eval``: whole model in eval mode (running statistics used, never updated) — the default for
attacks and power iterations. ``train``: train mode, BatchNorm updates its running statistics.
``frozen``: train mode (batch statistics, dropout on) but running statistics are never updated,
so perturbed inputs never leak into them."""


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def frozen_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Leave every module in its mode but keep train-mode BatchNorm from updating its running
    statistics: such layers normalize with batch statistics and update nothing. The one
    mechanism gradreg uses to keep perturbed inputs out of the running statistics.

    It switches ``track_running_stats`` off for the duration instead of restoring the buffers
    afterwards: an in-place restore would bump their autograd version and break the backward
    pass of any graph that saved them (an eval-mode BatchNorm in the clean pass)."""
    switched = [bn for bn in _bn_modules(model) if bn.training and bn.track_running_stats]
    try:
        for bn in switched:
            bn.track_running_stats = False
        yield model
    finally:
        for bn in switched:
            bn.track_running_stats = True


@contextmanager
def run_mode(model: nn.Module, policy: BNPolicy = "eval") -> Iterator[nn.Module]:
    """Run ``model`` under ``policy`` and restore every submodule's mode on exit, even when the
    body raises. ``frozen`` is train mode inside :func:`frozen_stats`."""
    check_policy(policy)
    saved_modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(policy != "eval")
        if policy == "frozen":
            with frozen_stats(model):
                yield model
        else:
            yield model
    finally:
        for m, was_training in saved_modes:
            m.training = was_training


def check_policy(policy: str) -> BNPolicy:
    """``policy`` as a :data:`BNPolicy`, or a one-line ``ValueError``."""
    if policy in BN_POLICIES:
        return cast(BNPolicy, policy)
    raise ValueError(f"unknown BatchNorm policy {policy!r}; use one of {BN_POLICIES}")


def perturbed_policy(model: nn.Module, policy: BNPolicy) -> BNPolicy:
    """The policy of a pass whose gradient flows into θ: ``policy`` while the model trains,
    ``"eval"`` while it is in eval mode (evaluating a penalty never switches batch statistics
    or dropout on)."""
    return policy if model.training else "eval"


# Layers whose forward does not read ``self.training`` (an allow-list: an unknown module type is
# assumed to depend on the mode). Containers are listed because their children are checked.
_MODE_FREE: tuple[type[nn.Module], ...] = (
    nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)


def mode_invariant(model: nn.Module) -> bool:
    """Whether the model computes the same function in train and eval mode: no BatchNorm,
    dropout or other mode-dependent layer. Modules of other types count as mode-free only when
    they say so with a class attribute ``mode_free = True`` (their own forward ignores the mode).

    Penalties use it to share the loop's train-mode clean pass with passes that their method
    runs in eval mode (a one-step attack's gradient, TRADES' p(x)): the same numbers, computed once.
    """
    while (inner := getattr(model, "module", None) or getattr(model, "_orig_mod", None)) is not None:
        model = inner  # look inside DistributedDataParallel / torch.compile wrappers
    return all(isinstance(m, _MODE_FREE) or getattr(type(m), "mode_free", False) for m in model.modules())
