"""Gradient attacks: FGSM, FGM, PGD and targeted PGD, all one projected-gradient loop
(:func:`gradreg.attacks.pgd_core.pgd`).

- FGSM (Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples",
  ICLR 2015): x_adv = Π(x + ε·sign ∇ₓL(x, y)) — PGD with one step of size ε, ℓ∞.
- FGM (Miyato et al. 2016; the ℓ2 fast gradient method): x_adv = Π(x + ε·g/‖g‖₂).
- PGD (Madry et al., ICLR 2018): ``steps`` steps of size α = ``rel_stepsize``·ε from a random
  point of the ball, each projected onto the ball ∩ bounds; ℓ∞ and ℓ2.
- T-PGD: PGD that *minimizes* the cross-entropy of a random target class t ≠ label (seeded),
  as in the T-PGD column of the SGR paper (Roth et al. 2018).

Example::

    attack = make("pgd", steps=40, rel_stepsize=0.1)
    x_adv = attack(model, x, y, ThreatModel("linf", 0.3, (0.0, 1.0)))
"""
from __future__ import annotations

import torch
from torch import nn

from ..modes import BNPolicy
from ..threat import ThreatModel
from . import ATTACKS
from .base import Attack, Labels
from .pgd_core import ce_loss, pgd


class PGD(Attack):
    """Projected gradient descent on the cross-entropy (untargeted, or targeted at a random class).

    ``rel_stepsize=None`` means 2.5/steps **(our choice)**: the heuristic of Madry et al.'s
    robustness library, which lets the walk cross the ball and come back. With one step and
    ``rel_stepsize=1`` this is FGSM/FGM.
    """

    def __init__(self, *, name: str = "pgd", norms: tuple[str, ...] = ("linf", "l2"), steps: int = 40,
                 rel_stepsize: float | None = None, random_start: bool = True, targeted: bool = False,
                 labels: Labels = "true", bn_policy: BNPolicy = "eval", seed: int = 0) -> None:
        super().__init__(name=name, norms=norms, labels=labels, bn_policy=bn_policy, seed=seed)
        if int(steps) < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        self.steps = int(steps)
        self.rel_stepsize = float(rel_stepsize) if rel_stepsize is not None else 2.5 / self.steps
        if not self.rel_stepsize > 0:
            raise ValueError(f"rel_stepsize must be > 0, got {rel_stepsize}")
        self.random_start = bool(random_start)
        self.targeted = bool(targeted)
        self.deterministic = not (self.random_start or self.targeted)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        gen = self.generator()
        if self.targeted:
            y = random_targets(model, x, y, gen)
        # bn_policy: the model is already in the attack's mode; pgd() re-enters the same policy
        return pgd(model, x, threat, ce_loss(y, targeted=self.targeted), steps=self.steps,
                   rel_stepsize=self.rel_stepsize, random_start=self.random_start, generator=gen,
                   bn_policy=self.bn_policy)


def random_targets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random class t ≠ yᵢ for every sample ``(N,)`` (drawn on the CPU, seeded)."""
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    shift = torch.randint(1, num_classes, (x.shape[0],), generator=generator).to(y.device)  # (N,) in [1, K)
    return (y + shift) % num_classes


@ATTACKS.register("fgsm")
def fgsm(*, labels: Labels = "true", bn_policy: BNPolicy = "eval") -> PGD:
    """FGSM (Goodfellow et al. 2015): one ℓ∞ step x + ε·sign ∇ₓL, clipped to the bounds."""
    return PGD(name="fgsm", norms=("linf",), steps=1, rel_stepsize=1.0, random_start=False, labels=labels,
               bn_policy=bn_policy)


@ATTACKS.register("fgm")
def fgm(*, labels: Labels = "true", bn_policy: BNPolicy = "eval") -> PGD:
    """FGM: one ℓ2 step x + ε·∇ₓL/‖∇ₓL‖₂, clipped to the bounds."""
    return PGD(name="fgm", norms=("l2",), steps=1, rel_stepsize=1.0, random_start=False, labels=labels,
               bn_policy=bn_policy)


@ATTACKS.register("pgd")
def pgd_attack(*, steps: int = 40, rel_stepsize: float | None = None, random_start: bool = True,
               labels: Labels = "true", bn_policy: BNPolicy = "eval", seed: int = 0) -> PGD:
    """PGD (Madry et al. 2018), ℓ∞/ℓ2, random start, step size rel_stepsize·ε (default 2.5/steps)."""
    return PGD(name="pgd", steps=steps, rel_stepsize=rel_stepsize, random_start=random_start, labels=labels,
               bn_policy=bn_policy, seed=seed)


@ATTACKS.register("tpgd")
def tpgd(*, steps: int = 40, rel_stepsize: float | None = None, random_start: bool = True,
         labels: Labels = "true", bn_policy: BNPolicy = "eval", seed: int = 0) -> PGD:
    """Targeted PGD towards a random class ≠ label (seeded), ℓ∞/ℓ2."""
    return PGD(name="tpgd", steps=steps, rel_stepsize=rel_stepsize, random_start=random_start, targeted=True,
               labels=labels, bn_policy=bn_policy, seed=seed)
