"""Widening a λ grid until the validation choice is interior, or a hard limit says why not.

A sweep whose best λ sits at an end of its grid says little: the rule's optimum may lie beyond
that end. :func:`decide` reads a finished grid (validation clean and PGD accuracy per λ, mean
over the validation seeds, and the clean reference model's) and either accepts the choice or
names the λ to train next:

- **the choice.** Points whose clean validation accuracy is below the clean model's minus
  ``tolerance_points`` are not admissible (the SGR paper's ``within-clean`` rule; ``best-pgd``
  has no floor). Among the admissible points, the smallest λ whose validation PGD accuracy is
  within ``margin_points`` of the best one (our choice: a larger λ must *win* by more than the
  margin to be preferred, so a difference of a few validation images never decides). A margin
  of 1 point is 16 of MNIST-10k's 1,600 validation images: about what an exact McNemar test
  needs at α = 0.05 when two models disagree on ~100 of them (|b − c| ≳ 2√(b + c) = 20), and
  far above the 1–7 images that decided earlier grids.
- **widening up** (×r beyond the top, r the grid's own ratio there, 10 for a one-point grid):
  when the top λ is the choice, i.e. it beats every smaller admissible λ by more than the
  margin — robustness still rises at the end.
- **widening down** (÷r below the bottom): when the bottom λ is the choice, some admissible
  larger λ is worse by more than the margin (robustness falls as λ grows) and the bottom is
  better than the clean model (λ = 0) by more than the margin; or when no λ is admissible (the
  clean model, λ → 0, always is).
- **stops**, each with its reason (:class:`Decision` ``stop``): ``interior``; ``limit`` (the
  end is a hard limit: λ ≤ 0 is impossible, and below the bottom there is only the clean
  model; DataGrad's finite-difference solver needs λ ≤ φ, Lyu's one-step mix λ ≤ 1, where the
  clean loss's weight reaches 0; or a stated maximum); ``plateau`` (no admissible λ differs
  from the choice by more than the margin, or the clean-accuracy floor bounds the choice from
  above: the grid resolves nothing further at this n); ``clean-model`` (the bottom is not
  better than the clean model by more than the margin: smaller λ only approaches it);
  ``max-widen`` (the rounds allowed are spent; the choice is still at an end).

One round adds one λ per widened end (both ends for a one-point grid), rounded to 3 significant
digits (our choice).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_FACTOR = 10.0  # our choice: the step beyond the end of a one-point grid


@dataclass(frozen=True)
class LamScore:
    """One λ's validation accuracies (means over its seeds); None while a seed is unfinished."""

    lam: float
    clean: float | None
    pgd: float | None
    seeds: int = 1

    @property
    def done(self) -> bool:
        return self.clean is not None and self.pgd is not None


@dataclass(frozen=True)
class Limits:
    """λ must be > 0 (λ = 0 is the clean model) and ≤ ``upper`` (inclusive), for ``upper_reason``."""

    upper: float = math.inf
    upper_reason: str = ""


@dataclass(frozen=True)
class Decision:
    chosen: float | None
    reason: str  # why this λ (or none)
    widen: tuple[float, ...]  # the λ to train next (empty: the choice stands)
    stop: str  # interior, limit, plateau, clean-model, max-widen, floor-none, pending, or "" while widening


def hard_limits(method: str, penalty: Mapping[str, Any], *, stated_max: float | None = None) -> Limits:
    """The largest λ a method's objective allows. DataGrad's finite-difference solver (Ororbia et
    al. 2017) weighs the clean loss by 1 − λ/φ (φ = ``fd_step``); Lyu et al. 2015's one-step
    solver by 1 − λ: beyond, the clean loss would be maximized. ``stated_max`` (a row's
    ``lam_max``) caps any method."""
    limits = Limits()
    if method == "datagrad" and penalty.get("solver") == "fd":
        phi = penalty.get("fd_step")
        if phi is None:  # the module's default: 2 × its default λ (gradreg.penalties.datagrad)
            phi = 0.1 if int(penalty.get("p", 1)) == 1 else 2.0
        limits = Limits(float(phi), f"DataGrad's finite-difference solver needs λ ≤ φ = {float(phi):g} "
                                    "(clean-loss weight 1 − λ/φ ≥ 0)")
    elif method == "lyu" and penalty.get("solver") == "onestep":
        limits = Limits(1.0, "Lyu's one-step objective needs λ ≤ 1 (clean-loss weight 1 − λ ≥ 0; λ = 1 is the paper's)")
    if stated_max is not None and stated_max < limits.upper:
        limits = Limits(float(stated_max), f"the row's stated maximum λ = {float(stated_max):g}")
    return limits


def _nice(value: float, upper: float) -> float:
    """``value`` to 3 significant digits (our choice: λ that read well in tables and run names),
    never above ``upper``."""
    return min(float(f"{value:.3g}"), upper)


def _ratio(a: float, b: float) -> float:
    """b / a for neighbouring grid points a < b (a > 0), else the default factor."""
    return b / a if a > 0 and b > a else DEFAULT_FACTOR


def decide(scores: Sequence[LamScore], reference: LamScore, *, rule: str = "within-clean",
           tolerance_points: float = 1.0, margin_points: float = 1.0, limits: Limits = Limits(),
           rounds_left: int = 0) -> Decision:
    """The choice on a finished grid and whether to widen it (module doc). ``reference`` is the
    clean model's score (its ``lam`` is ignored); ``rounds_left`` = widening rounds still allowed."""
    grid = sorted(scores, key=lambda s: s.lam)
    if not grid:
        raise ValueError("decide needs at least one λ")
    if any(not s.done for s in [*grid, reference]):
        return Decision(None, "some runs have not finished", (), "pending")
    if rule not in ("within-clean", "best-pgd"):
        raise ValueError(f"unknown selection rule {rule!r}")
    m = margin_points / 100
    points = f"{margin_points:g} point{'' if margin_points == 1 else 's'}"
    floor = (reference.clean - tolerance_points / 100) if rule == "within-clean" else -math.inf  # type: ignore[operator]  # done: not None
    admissible = [s for s in grid if s.clean >= floor - 1e-12]  # type: ignore[operator]
    lo, hi = grid[0], grid[-1]
    ratio_lo = _ratio(lo.lam, grid[1].lam) if len(grid) > 1 else DEFAULT_FACTOR
    ratio_hi = _ratio(grid[-2].lam, hi.lam) if len(grid) > 1 else DEFAULT_FACTOR
    down = (_nice(lo.lam / ratio_lo, math.inf),)

    def widen(values: tuple[float, ...], why: str, chosen: float | None, reason: str) -> Decision:
        if rounds_left <= 0:
            return Decision(chosen, f"{reason}; {why}, but no round is left to widen it (max_widen, or widening off)",
                            (), "max-widen")
        return Decision(chosen, f"{reason}; {why}: widening", values, "")

    if not admissible:
        reason = f"no λ keeps clean validation accuracy ≥ {floor:.4f}"
        return widen(down, "smaller λ approach the clean model, which does", None, reason)
    best = max(s.pgd for s in admissible)  # type: ignore[type-var]
    chosen = min((s for s in admissible if s.pgd >= best - m - 1e-12), key=lambda s: s.lam)  # type: ignore[operator]
    reason = (f"the smallest λ within {points} of the best validation PGD accuracy ({best:.4f}) among "
              f"{len(admissible)} λ" + (f" with clean accuracy ≥ {floor:.4f}" if rule == "within-clean" else ""))
    up = hi.lam * ratio_hi
    at_limit = hi.lam >= limits.upper * (1 - 1e-9)
    up_values = () if at_limit else (_nice(up, limits.upper),)
    if len(grid) == 1:  # one point: no neighbour tells the direction, look both ways
        values = down + up_values
        return widen(values, "a one-point grid", chosen.lam, reason)
    better_than_clean = chosen.pgd > reference.pgd + m  # type: ignore[operator]
    if chosen is hi:  # it beats every smaller admissible λ by more than the margin
        if at_limit:
            return Decision(chosen.lam, f"{reason}; the top of the grid is a hard limit: {limits.upper_reason}", (), "limit")
        return widen(up_values, "robustness still rises at the top of the grid", chosen.lam, reason)
    if chosen is lo:
        if not any(s.pgd < chosen.pgd - m for s in admissible):  # type: ignore[operator]
            why = ("the clean-accuracy floor excludes every larger λ" if len(admissible) == 1 else
                   f"no admissible λ differs from it by more than {points}")
            return Decision(chosen.lam, f"{reason}; {why}", (), "plateau")
        if not better_than_clean:
            return Decision(chosen.lam, f"{reason}; it is within {points} of the clean model (λ = 0), "
                                        "which smaller λ only approach", (), "clean-model")
        return widen(down, "robustness falls as λ grows from the bottom of the grid", chosen.lam, reason)
    return Decision(chosen.lam, f"{reason}; interior to the grid", (), "interior")
