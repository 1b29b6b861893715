"""Fast robustness curves: PGD over K radii by per-example bisection with early stops.

A robustness curve asks, for every radius ε₁ < … < ε_M, whether PGD breaks each input. Run
afresh, that is M attacks of every input; the carry-over sweep of
:meth:`gradreg.attacks.base.Attack.perturb_multi` skips the inputs already broken at a smaller
radius but still attacks every robust input at every radius (about 4–6× one radius for 8 radii
on a briefly trained MNIST CNN). Here each input's place on the curve is found by bisection
instead (**our design**):

1. every input still classified correctly is attacked at the largest radius ε_M first, from
   the random start that a fresh PGD at ε_M draws (the same generator and draw order);
2. an input broken at ε_M is bisected over the radii in between: it is attacked at the middle
   radius of the interval (ε_lo, ε_hi] in which its smallest breaking radius lies (ε_lo: the
   largest radius at which PGD failed, or 0; ε_hi: the smallest at which it succeeded), until
   the interval holds one radius — about log₂ M more attacks, each a PGD with the same steps,
   step size (∝ its radius) and a random start, as a fresh PGD at that radius;
3. whenever an input is broken, the projections of its example onto the radii of its interval
   are tried first (one forward pass each), which moves ε_hi down for free where one is
   misclassified;
4. every attack stops, per input, at its first misclassified iterate
   (:func:`gradreg.attacks.pgd_core.pgd_until_fooled`), so the broken inputs cost only the
   steps they need.

Warm starts (each attempt started at the projection of the input's smallest example found so
far) were tried and dropped: on a PGD-trained digits model they made the curve up to 2 points
weaker than fresh PGD, where random starts stay within 1 image of 360.

The output at each radius ε_k is the projection of the input's smallest adversarial example
onto the ε_k-ball (the example itself at every radius ≥ the one it was found at), or of the
last failed attempt for an input never broken — real points, which the judge re-checks,
re-projects and re-scores at every radius like any attack's.

What it assumes. "Broken at ε_j ⇒ broken at every ε ≥ ε_j" is exact (the example lies in the
larger ball). "PGD failed at ε_j ⇒ robust at every ε < ε_j" is not: a radius below the place
of an input is never tried, and a fresh PGD there could still break it where the attack at the
larger radius did not (its random start or its step size, ∝ ε, made the difference). An input
robust at ε_M is attacked once. Measured against the fresh per-ε PGD curve with the same steps,
step size and seed (``BENCHMARKS.md``, section "Robustness curves"): at most 0.2 points above it
on MNIST-10k (500 points, one seed), 1 image of 360 above it on a PGD-trained digits model
(3 seeds), and 4 images of 360 (1.1 points) at one radius on the clean digits test model — the
size of PGD's own seed-to-seed noise there; the early stops make it lower at other radii. For the same reason this curve cannot show the gradient-masking sign
"accuracy rises with ε": the raw per-ε curve that check needs is the fresh one
(``carry_over=False``), which this sweep never replaces.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..inference import predict
from ..threat import ThreatModel
from .pgd_core import pgd_until_fooled


def bisection_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                    eps_values: Sequence[float], *, steps: int, rel_stepsize: float, random_start: bool,
                    generator: torch.Generator | None, project_down: bool = True) -> torch.Tensor:
    """Adversarial examples ``(K, N, ...)`` for every ε of ``eps_values`` (in the order given)
    by the bisection described in the module docstring. ``y`` are the labels to move away from;
    the model runs in its current mode (the attack's BatchNorm policy)."""
    radii = sorted({float(e) for e in eps_values if e > 0})  # ε₁ < … < ε_M
    m = len(radii)
    r = torch.tensor([0.0, *radii], dtype=x.dtype, device=x.device)  # (M + 1,) index 0: the clean input
    x = x.detach()
    lo = torch.zeros(len(x), dtype=torch.long, device=x.device)  # (N,) largest index PGD failed at (0: clean)
    hi = torch.full((len(x),), m + 1, dtype=torch.long, device=x.device)  # (N,) smallest index broken (M + 1: none)
    hi[predict(model, x) != y] = 0  # already misclassified: broken at every radius
    best = x.clone()  # (N, ...) smallest adversarial example found, or the last failed attempt
    while True:
        todo = (lo + 1 < hi).nonzero().squeeze(1)  # (T,) inputs whose place is still open
        if not todo.numel():
            break
        unseen = hi[todo] > m  # (T,) never broken: try the largest radius first
        mid = torch.where(unseen, torch.full_like(lo[todo], m), (lo[todo] + hi[todo]) // 2)  # (T,)
        eps = r[mid]  # (T,)
        x_sub = x[todo]
        # every attempt starts as a fresh PGD at its radius does (warm starts at the projection
        # of the smallest example found were weaker on an adversarially trained model)
        start = threat.random_start(x_sub, generator, eps) if random_start else x_sub
        x_adv, hit = pgd_until_fooled(model, x_sub, y[todo], threat, steps=steps, rel_stepsize=rel_stepsize,
                                      eps=eps, start=start)
        hi[todo[hit]] = mid[hit]
        lo[todo[~hit]] = mid[~hit]
        keep = hit | unseen  # a failed attempt replaces nothing but the clean input
        best[todo[keep]] = x_adv[keep]
        if project_down:
            place_by_projection(model, x, y, threat, r, todo[hit], lo, hi, best)
    out = x.new_empty((len(eps_values), *x.shape))  # (K, N, ...)
    for k, e in enumerate(eps_values):
        out[k] = x if e == 0 else threat.project(x, best, float(e))
    return out


def place_by_projection(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, r: torch.Tensor,
                        rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, best: torch.Tensor) -> None:
    """For the inputs ``rows`` ``(R,)`` just broken at radius index ``hi``, try the projection of
    their example onto every radius between ``lo`` and ``hi`` (one forward pass per radius, in
    increasing order) and move ``hi``/``best`` (updated in place) to the smallest radius at which
    the projection is misclassified: an adversarial example there for the price of a forward pass."""
    for j in range(1, len(r) - 1):
        cand = rows[(lo[rows] < j) & (hi[rows] > j)]  # (C,) inputs whose open interval holds radius j
        if not cand.numel():
            continue
        x_proj = threat.project(x[cand], best[cand], r[j])  # (C, ...)
        fooled = predict(model, x_proj) != y[cand]  # (C,)
        hi[cand[fooled]] = j
        best[cand[fooled]] = x_proj[fooled]
