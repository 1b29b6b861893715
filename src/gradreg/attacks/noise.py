"""Random-noise attacks, worst-of-k: uniform and Gaussian noise in the ε-ball.

A noise attack draws ``samples`` perturbed copies of every input; the input counts as robust
only if *all* copies are classified correctly (worst-of-k, as for the LRC attack of the SGR
paper). The attack returns the first misclassified copy, or the first copy if none is.
Copies are only drawn for inputs that are still robust, in chunks of up to ``chunk_size``
images per forward pass.

- ``uniform``: δ uniform in the ε-ball of the threat's norm (cube for ℓ∞, ball for ℓ2/ℓ1),
  then clipped to the bounds — the "rand" column of the SGR paper's tables.
- ``gaussian``: z ~ N(0, I) scaled onto the sphere of the ε-ball, δ = ε·z/‖z‖_p, then clipped
  **(our choice)**: for ℓ2 this is foolbox's additive Gaussian noise attack (a uniformly
  random direction at distance ε); for ℓ∞ the largest coordinate reaches ε.

Example::

    attack = make("uniform", samples=10)
    x_adv = attack(model, x, y, ThreatModel("linf", 0.3, (0.0, 1.0)))
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..modes import BNPolicy
from ..threat import ThreatModel, flat_norm
from . import ATTACKS
from ..inference import predict
from .base import Attack, Labels


class NoiseAttack(Attack):
    """Worst-of-``samples`` random perturbations; subclasses implement :meth:`sample`."""

    deterministic = False

    def __init__(self, *, name: str, norms: Sequence[str] = ("linf", "l2", "l1"), samples: int = 1,
                 chunk_size: int = 4096, labels: Labels = "true", bn_policy: BNPolicy = "eval",
                 seed: int = 0) -> None:
        super().__init__(name=name, norms=norms, labels=labels, bn_policy=bn_policy, seed=seed)
        if int(samples) < 1:
            raise ValueError(f"samples must be ≥ 1, got {samples}")
        self.samples = int(samples)
        self.chunk_size = max(1, int(chunk_size))

    def sample(self, x: torch.Tensor, threat: ThreatModel, copies: int, generator: torch.Generator) -> torch.Tensor:
        """``copies`` perturbed versions of ``x``: ``(copies, M, ...)`` inside the bounds."""
        raise NotImplementedError

    def noise_generator(self, x: torch.Tensor) -> torch.Generator:
        return self.generator()

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        gen = self.noise_generator(x)
        result = x.clone()  # (N, ...)
        remaining = torch.arange(x.shape[0], device=x.device)  # (M,) inputs not fooled yet
        drawn = 0
        with torch.no_grad():
            while drawn < self.samples and remaining.numel():
                m = remaining.numel()
                copies = max(1, min(self.samples - drawn, self.chunk_size // m))
                xs = self.sample(x[remaining], threat, copies, gen)  # (c, M, ...)
                wrong = predict(model, xs.flatten(0, 1)).view(copies, m) != y[remaining]  # (c, M)
                fooled = wrong.any(dim=0)  # (M,)
                first = wrong.to(torch.int8).argmax(dim=0)  # (M,) first misclassified copy (0 if none)
                if drawn == 0:  # "any copy" for the inputs no copy fools
                    result[remaining] = xs[0]
                hit = fooled.nonzero().squeeze(1)
                result[remaining[hit]] = xs[first[hit], hit]
                remaining = remaining[~fooled]
                drawn += copies
        return result


class UniformNoise(NoiseAttack):
    """δ uniform in the ε-ball (cube for ℓ∞), clipped to the bounds."""

    def sample(self, x: torch.Tensor, threat: ThreatModel, copies: int, generator: torch.Generator) -> torch.Tensor:
        rep = x.expand(copies, *x.shape).flatten(0, 1)  # (c·M, ...)
        return threat.random_start(rep, generator).view(copies, *x.shape)


class GaussianNoise(NoiseAttack):
    """δ = ε·z/‖z‖_p with z ~ N(0, I) (our choice, see module docstring), clipped to the bounds."""

    def sample(self, x: torch.Tensor, threat: ThreatModel, copies: int, generator: torch.Generator) -> torch.Tensor:
        # drawn on the CPU so a seed gives the same noise on every device
        z = torch.randn((copies, *x.shape), generator=generator, dtype=x.dtype).to(x.device)  # (c, M, ...)
        flat = z.flatten(0, 1)  # (c·M, ...)
        scale = threat.eps / flat_norm(flat, threat.norm).clamp_min(1e-12)  # (c·M,)
        delta = flat * scale.view(-1, *([1] * (flat.dim() - 1)))
        return threat.clip(x.expand(copies, *x.shape).flatten(0, 1) + delta).view(copies, *x.shape)


@ATTACKS.register("uniform")
def uniform(*, samples: int = 1, chunk_size: int = 4096, labels: Labels = "true", bn_policy: BNPolicy = "eval",
            seed: int = 0) -> UniformNoise:
    """Uniform noise in the ε-ball, worst-of-k (samples=1 by default)."""
    return UniformNoise(name="uniform", samples=samples, chunk_size=chunk_size, labels=labels,
                        bn_policy=bn_policy, seed=seed)


@ATTACKS.register("gaussian")
def gaussian(*, samples: int = 1, chunk_size: int = 4096, labels: Labels = "true", bn_policy: BNPolicy = "eval",
             seed: int = 0) -> GaussianNoise:
    """Gaussian noise scaled onto the ε-sphere (δ = ε·z/‖z‖_p), worst-of-k (samples=1 by default)."""
    return GaussianNoise(name="gaussian", samples=samples, chunk_size=chunk_size, labels=labels,
                         bn_policy=bn_policy, seed=seed)
