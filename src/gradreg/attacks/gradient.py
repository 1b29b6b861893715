"""Gradient attacks: FGSM, FGM, PGD and targeted PGD, all one projected-gradient loop
(:func:`gradreg.attacks.pgd_core.pgd`).

- FGSM (Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples",
  ICLR 2015): x_adv = Π(x + ε·sign ∇ₓL(x, y)) — PGD with one step of size ε, ℓ∞.
- FGM (Miyato et al. 2016; the ℓ2 fast gradient method): x_adv = Π(x + ε·g/‖g‖₂).
- PGD (Madry et al., ICLR 2018): ``steps`` steps of size α = ``rel_stepsize``·ε from a random
  point of the ball, each projected onto the ball ∩ bounds; ℓ∞ and ℓ2.
- T-PGD: PGD that *minimizes* the cross-entropy of a target class t ≠ label: a random one
  (seeded; the usual definition, ``tpgd``), the least-likely one (Kurakin et al. 2017,
  ``targets="least-likely"``), or every one in turn (``tpgd-all``).

T-PGD and the SGR paper (Roth et al. 2018): the paper's T-PGD column lies *below* its PGD column
for the clean model (MNIST: 74.1 vs 78.3), i.e. its targeted attack is the stronger one. A
single random or least-likely target cannot do that: reaching one given class is harder than
leaving the true one, and on a clean digits model both give accuracies far *above* PGD's (at
ε = 0.1, ℓ∞, 40 steps, C&W CNN trained clean for 15 epochs, its 360 test points: PGD 0.47,
random target 0.83, least-likely 0.85). Counting a point as broken when *any*
of the K − 1 targeted runs changes its class (the multi-target view of AutoAttack's APGD-T,
Croce & Hein 2020) gives 0.42, below PGD, as in the paper. ``tpgd-all`` is that reading
(**our reading**: the paper does not define its T-PGD); it costs K − 1 PGD runs.

Example::

    attack = make("pgd", steps=40, rel_stepsize=0.1)
    x_adv = attack(model, x, y, ThreatModel("linf", 0.3, (0.0, 1.0)))
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..modes import BNPolicy, run_mode
from ..threat import ThreatModel, parse_eps
from . import ATTACKS
from ..inference import predict
from .base import Attack, Labels
from .curves import bisection_sweep
from .pgd_core import ce_loss, pgd

SWEEPS = ("fast", "carry")


class PGD(Attack):
    """Projected gradient descent on the cross-entropy (untargeted, or targeted at a random class).

    ``rel_stepsize=None`` means 2.5/steps **(our choice)**: the heuristic of Madry et al.'s
    robustness library, which lets the walk cross the ball and come back. With one step and
    ``rel_stepsize=1`` this is FGSM/FGM. ``restarts=R`` (untargeted, random start) runs the walk
    R times from fresh random starts; each sample keeps the first example that changes its class
    (the last walk's if none does), so R restarts never find fewer examples than one.

    ``sweep`` decides how :meth:`perturb_multi` answers several radii with carry-over:
    ``"carry"`` is the base class's loop (every input still robust is attacked afresh at every
    radius, in increasing order); ``"fast"`` places each input on the curve by bisection with
    early stops (:mod:`gradreg.attacks.curves`, our design; see ``BENCHMARKS.md`` for its cost
    and its gap to fresh PGD, and its docstring for what it assumes). The fast sweep applies to
    untargeted PGD with more than one step, the ``eval``
    BatchNorm policy, one restart and at least two radii > 0; otherwise, and always for
    ``carry_over=False`` (the raw per-ε curve, transfer), the attack runs as ``"carry"``.
    """

    def __init__(self, *, name: str = "pgd", norms: tuple[str, ...] = ("linf", "l2"), steps: int = 40,
                 rel_stepsize: float | None = None, random_start: bool = True, targeted: bool = False,
                 targets: str = "random", labels: Labels = "true", bn_policy: BNPolicy = "eval",
                 seed: int = 0, restarts: int = 1, sweep: str = "carry") -> None:
        super().__init__(name=name, norms=norms, labels=labels, bn_policy=bn_policy, seed=seed)
        if int(steps) < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        if int(restarts) < 1 or (int(restarts) > 1 and (targeted or not random_start)):
            raise ValueError(f"restarts must be ≥ 1, and > 1 only for untargeted PGD with random start, got {restarts}")
        self.restarts = int(restarts)
        self.steps = int(steps)
        self.rel_stepsize = float(rel_stepsize) if rel_stepsize is not None else 2.5 / self.steps
        if not self.rel_stepsize > 0:
            raise ValueError(f"rel_stepsize must be > 0, got {rel_stepsize}")
        self.random_start = bool(random_start)
        self.targeted = bool(targeted)
        if targets not in TARGETS:
            raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
        self.targets = targets
        if sweep not in SWEEPS:
            raise ValueError(f"sweep must be one of {', '.join(SWEEPS)}, got {sweep!r}")
        self.sweep = sweep
        self.deterministic = not (self.random_start or self.targeted)

    def perturb_multi(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                      eps_list: Sequence[float], *, carry_over: bool = True) -> torch.Tensor:
        """As :meth:`Attack.perturb_multi`; with ``sweep="fast"`` (where it applies, see the class
        docstring) the carry-over curve comes from :func:`gradreg.attacks.curves.bisection_sweep`."""
        eps_values = [parse_eps(e) for e in eps_list]
        if not (carry_over and self.fast_sweep_applies(eps_values)):
            return super().perturb_multi(model, x, y, threat, eps_values, carry_over=carry_over)
        self.check_threat(threat)
        x = x.detach()
        with run_mode(model, self.bn_policy), torch.enable_grad():
            y_att = self.attack_labels(model, x, y)
            return bisection_sweep(model, x, y_att, threat, eps_values, steps=self.steps,
                                   rel_stepsize=self.rel_stepsize, random_start=self.random_start,
                                   generator=self.generator())

    def fast_sweep_applies(self, eps_values: Sequence[float]) -> bool:
        """Whether :meth:`perturb_multi` with carry-over runs the fast sweep for these radii."""
        # one restart: the bisection's attempts are single walks (restarts keep the carry loop)
        return (self.sweep == "fast" and not self.targeted and self.steps > 1 and self.bn_policy == "eval"
                and self.restarts == 1 and len({e for e in eps_values if e > 0}) > 1)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        gen = self.generator()
        if self.targeted and self.targets == "all":
            return self._perturb_all_targets(model, x, y, threat, gen)
        if self.targeted:
            y = random_targets(model, x, y, gen) if self.targets == "random" else least_likely_targets(model, x)
        # bn_policy: the model is already in the attack's mode; pgd() re-enters the same policy
        def walk(rows: torch.Tensor | slice) -> torch.Tensor:
            return pgd(model, x[rows], threat, ce_loss(y[rows], targeted=self.targeted), steps=self.steps,
                       rel_stepsize=self.rel_stepsize, random_start=self.random_start, generator=gen,
                       bn_policy=self.bn_policy)

        out = walk(slice(None))
        todo = (predict(model, out) == y).nonzero().squeeze(1) if self.restarts > 1 else None  # (M,) not broken yet
        for _ in range(self.restarts - 1):
            assert todo is not None
            if not todo.numel():
                break
            x_adv = walk(todo)
            out[todo] = x_adv
            todo = todo[predict(model, x_adv) == y[todo]]
        return out


    def _perturb_all_targets(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                             gen: torch.Generator) -> torch.Tensor:
        """Targeted PGD at t = y + 1, …, y + K − 1 (mod K) in turn; each sample keeps the first
        example whose class differs from ``y`` (or ``x`` if none does). Only the samples not yet
        broken are attacked again."""
        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]
        out = x.clone()
        broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)  # (N,)
        for shift in range(1, num_classes):
            todo = (~broken).nonzero().squeeze(1)  # (M,)
            if not todo.numel():
                break
            t = (y[todo] + shift) % num_classes  # (M,)
            x_adv = pgd(model, x[todo], threat, ce_loss(t, targeted=True), steps=self.steps,
                        rel_stepsize=self.rel_stepsize, random_start=self.random_start, generator=gen,
                        bn_policy=self.bn_policy)
            hit = predict(model, x_adv) != y[todo]  # (M,)
            out[todo[hit]] = x_adv[hit]
            broken[todo[hit]] = True
        return out


TARGETS = ("random", "least-likely", "all")


def least_likely_targets(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class of lowest logit for every sample ``(N,)`` (Kurakin, Goodfellow, Bengio 2017)."""
    with torch.no_grad():
        return model(x).argmin(dim=1)


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
               labels: Labels = "true", bn_policy: BNPolicy = "eval", seed: int = 0, restarts: int = 1,
               sweep: str = "fast") -> PGD:
    """PGD (Madry et al. 2018), ℓ∞/ℓ2, random start, step size rel_stepsize·ε (default 2.5/steps),
    ``restarts`` random starts (a sample counts as broken if any of them breaks it); several radii
    by the fast bisection sweep (``sweep="carry"``: every radius afresh)."""
    return PGD(name="pgd", steps=steps, rel_stepsize=rel_stepsize, random_start=random_start, labels=labels,
               bn_policy=bn_policy, seed=seed, restarts=restarts, sweep=sweep)


@ATTACKS.register("tpgd")
def tpgd(*, steps: int = 40, rel_stepsize: float | None = None, random_start: bool = True,
         targets: str = "random", labels: Labels = "true", bn_policy: BNPolicy = "eval", seed: int = 0) -> PGD:
    """Targeted PGD towards a random class ≠ label (seeded; or ``targets="least-likely"``), ℓ∞/ℓ2."""
    return PGD(name="tpgd", steps=steps, rel_stepsize=rel_stepsize, random_start=random_start, targeted=True,
               targets=targets, labels=labels, bn_policy=bn_policy, seed=seed)


@ATTACKS.register("tpgd-all")
def tpgd_all(*, steps: int = 40, rel_stepsize: float | None = None, random_start: bool = True,
             labels: Labels = "true", bn_policy: BNPolicy = "eval", seed: int = 0) -> PGD:
    """Targeted PGD at every class ≠ label in turn; broken if any target changes the class
    (our reading of the SGR paper's T-PGD; K − 1 PGD runs), ℓ∞/ℓ2."""
    return PGD(name="tpgd-all", steps=steps, rel_stepsize=rel_stepsize, random_start=random_start, targeted=True,
               targets="all", labels=labels, bn_policy=bn_policy, seed=seed)
