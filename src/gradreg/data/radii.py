"""Each data set's standard attack radii, in the units of its input (a fact about the data set,
so it sits in the data layer: the monitor, the protocols and the CLI all read it)."""
from __future__ import annotations

CIFAR_LIKE = ("cifar10", "cifar100")


def standard_eps(data_name: str, norm: str = "linf") -> float:
    """The data set's standard AutoAttack radius (RobustBench's ℓ∞ convention): 8/255 for
    CIFAR, 0.3 for the MNIST family (digits included); ℓ2: 0.5 CIFAR, 2.0 MNIST family."""
    cifar = data_name in CIFAR_LIKE
    if norm == "l2":
        return 0.5 if cifar else 2.0
    return 8 / 255 if cifar else 0.3


def default_grid(data_name: str, *, points: int = 9) -> list[float]:
    """ε grid of the SGR paper's metric: [0, 32]/255 (MNIST-like) or [0, 8]/255 (CIFAR)."""
    top = 8 / 255 if data_name in CIFAR_LIKE else 32 / 255
    return [top * i / (points - 1) for i in range(points)]
