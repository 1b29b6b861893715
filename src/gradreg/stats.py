"""Statistics behind every accuracy gradreg reports: intervals, seeds and paired comparisons.

An accuracy measured on n test points is a binomial proportion; a difference of a few images
between two methods is often sampling noise. Every table therefore carries n and a 95 %
interval, and a claim that one method beats another rests on a paired test on the same points.

- One run: the **Wilson score interval** (Wilson 1927). Unlike the normal ("Wald") interval it
  stays inside [0, 1] and keeps close to its nominal coverage near 0 % and 100 %, where robust
  accuracies often sit.
- Several seeds on the same test points (our choice, reasoned): the seeds vary the training,
  while the n test points are shared by all of them, so averaging seeds does not shrink the
  test-sampling error. The interval is centred on the seed mean p̄ and its half-width adds in
  quadrature the Student-t half-width of the seed mean, t_{0.975, S−1}·s/√S (training
  randomness), and the Wilson half-width of p̄ at n (test sampling); it is clipped to [0, 1].
- Paired comparison, one run each: the **exact McNemar test** — under H₀ the discordant
  points (right for one model, wrong for the other) split as Binomial(b + c, ½).
- Paired comparison over seeds, ``(S, n)`` outcomes: the **two-level randomization test** of
  :func:`two_level_test` (our choice, argued there): its unit of replication includes the
  training seed, so a p-value speaks about the *method*, not only about these trained models,
  and with all seeds identical it is exact McNemar (up to Monte-Carlo error).
- Grid averages (a point's accuracy averaged over an ε grid, scores in [0, 1]) take the same
  two-level test (for one seed its point level alone: a paired sign-flip permutation test).
- A report makes *families* of verdicts (all row comparisons of one column, all bar verdicts of
  its honest reading); within each family the p-values are corrected by **Holm's step-down
  method** (:func:`holm`, Holm 1979), which controls the family-wise error rate at α under any
  dependence between the tests. Reports print the raw and the adjusted p; verdicts use the
  adjusted one.

A difference is stated only when its (adjusted) test gives p < α (0.05); otherwise reports say
"not distinguishable at this n".
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

ALPHA = 0.05
Z95 = 1.959963984540054  # Φ⁻¹(0.975)


@dataclass(frozen=True)
class Interval:
    """An accuracy with its n and 95 % interval; all values are fractions in [0, 1]."""

    value: float
    n: int
    lo: float
    hi: float
    seeds: int = 1
    spread: float | None = None  # standard deviation over seeds (None for one run)

    def as_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "n": self.n, "lo": self.lo, "hi": self.hi,
                "seeds": self.seeds, "spread": self.spread}

    def text(self, *, digits: int = 1) -> str:
        """``97.4 [96.1, 98.3]`` (percent); with seeds ``97.4 ± 0.3 [95.9, 98.6]``."""
        pct = lambda v: f"{100 * v:.{digits}f}"  # noqa: E731
        spread = "" if self.spread is None else f" ± {pct(self.spread)}"
        return f"{pct(self.value)}{spread} [{pct(self.lo)}, {pct(self.hi)}]"


def wilson_interval(successes: float, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``."""
    if n <= 0:
        raise ValueError(f"an interval needs n > 0, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at p = 0 or 1 one end is exactly 0 or 1; rounding must not move it past
    return (0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half))


def proportion(correct: torch.Tensor | np.ndarray | Sequence[bool]) -> Interval:
    """Accuracy of one run from its per-example outcomes ``(n,)``, with the Wilson interval."""
    flags = np.asarray(correct.cpu() if isinstance(correct, torch.Tensor) else correct, dtype=bool).ravel()
    k, n = int(flags.sum()), int(flags.size)
    lo, hi = wilson_interval(k, n)
    return Interval(value=k / n, n=n, lo=lo, hi=hi)


def from_count(successes: int, n: int) -> Interval:
    lo, hi = wilson_interval(successes, n)
    return Interval(value=successes / n, n=n, lo=lo, hi=hi)


def mean_score(scores: torch.Tensor | np.ndarray | Sequence[float]) -> Interval:
    """Mean of per-example scores in [0, 1] ``(n,)`` — e.g. each point's accuracy averaged over
    an ε grid — with a Wilson interval at the same mean and n (our choice, reasoned): a score in
    [0, 1] with mean μ has variance ≤ μ(1 − μ) (Bhatia–Davis), the variance of a 0/1 outcome,
    so this interval is at least as wide as the mean's own normal interval; for 0/1 scores it
    is :func:`proportion`'s interval."""
    arr = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=float).ravel()
    if arr.size == 0:
        raise ValueError("mean_score needs at least one score")
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError("scores must lie in [0, 1]")
    n = int(arr.size)
    total = float(arr.sum())
    lo, hi = wilson_interval(min(float(n), max(0.0, total)), n)  # a real-valued "count"
    return Interval(value=total / n, n=n, lo=lo, hi=hi)


def over_seeds(accuracies: Sequence[float], n: int) -> Interval:
    """Seed mean, spread and interval of accuracies measured on the same ``n`` test points
    (see the module docstring for the choice)."""
    acc = np.asarray(accuracies, dtype=float)
    if acc.size == 0:
        raise ValueError("over_seeds needs at least one accuracy")
    if acc.size == 1:
        return from_count(round(float(acc[0]) * n), n)
    from scipy.stats import t as student_t  # scipy ships with scikit-learn

    mean, sd, s = float(acc.mean()), float(acc.std(ddof=1)), acc.size
    lo_w, hi_w = wilson_interval(round(mean * n), n)
    test_half = (hi_w - lo_w) / 2
    seed_half = float(student_t.ppf(0.975, s - 1)) * sd / math.sqrt(s)
    half = math.hypot(test_half, seed_half)
    return Interval(value=mean, n=n, lo=max(0.0, mean - half), hi=min(1.0, mean + half), seeds=int(s), spread=sd)


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of two models (or methods) on the same test points."""

    a: str
    b: str
    diff: float  # accuracy(a) − accuracy(b), fraction
    p_value: float
    test: str  # "mcnemar-exact", "sign-flip" (one seed, scores) or "two-level" (seeds and points)
    n: int
    only_a: int | None = None  # points a gets right and b wrong (McNemar's b)
    only_b: int | None = None
    seeds: int = 1
    p_adjusted: float | None = None  # Holm-adjusted within the report's family of verdicts (None: single test)
    family: int = 1  # how many tests that family holds

    @property
    def p(self) -> float:
        """The p-value verdicts use: the adjusted one where the test belongs to a family."""
        return self.p_value if self.p_adjusted is None else self.p_adjusted

    @property
    def significant(self) -> bool:
        return self.p < ALPHA

    def p_text(self) -> str:
        """``two-level p = 0.03, Holm-adjusted 0.4 over 17`` (the raw and the adjusted p)."""
        raw = f"{self.test} p = {self.p_value:.2g}"
        return raw if self.p_adjusted is None else f"{raw}, Holm-adjusted {self.p_adjusted:.2g} over {self.family}"

    def wording(self) -> str:
        """The sentence a report may print about this difference."""
        seeds = f", {self.seeds} seeds" if self.seeds > 1 else ""
        if not self.significant:
            return (f"{self.a} vs {self.b}: not distinguishable at this n "
                    f"(difference {100 * self.diff:+.1f} points, {self.p_text()}, n = {self.n}{seeds})")
        better, worse = (self.a, self.b) if self.diff > 0 else (self.b, self.a)
        return (f"{better} is more accurate than {worse} by {100 * abs(self.diff):.1f} points "
                f"({self.p_text()}, n = {self.n}{seeds})")

    def adjusted(self, p_adjusted: float, family: int) -> Comparison:
        return replace(self, p_adjusted=p_adjusted, family=family)

    def as_dict(self) -> dict[str, object]:
        return {"a": self.a, "b": self.b, "diff": self.diff, "p_value": self.p_value, "p_adjusted": self.p_adjusted,
                "family": self.family, "test": self.test, "n": self.n, "seeds": self.seeds, "only_a": self.only_a,
                "only_b": self.only_b, "significant": self.significant}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given: sort ascending,
    p̃_(j) = max_{k ≤ j} min(1, (m − k + 1)·p_(k)). Rejecting where p̃ < α controls the
    family-wise error rate at α under any dependence between the m tests."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


def adjust_family(tests: Sequence[Comparison]) -> list[Comparison]:
    """Every comparison of one family with its Holm-adjusted p (a family of one is left alone)."""
    if len(tests) < 2:
        return list(tests)
    return [t.adjusted(p, len(tests)) for t, p in zip(tests, holm([t.p_value for t in tests]))]


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: 2·P[Binomial(b + c, ½) ≤ min(b, c)], capped at 1."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    k = min(only_a, only_b)
    # log-space sum: m can be in the thousands, where 0.5**m underflows
    logs = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2 * tail)


def _flags(x: torch.Tensor | np.ndarray | Sequence[bool] | Sequence[Sequence[bool]]) -> np.ndarray:
    return np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=bool)


def _scores(x: torch.Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=float)


def is_binary(x: torch.Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]) -> bool:
    arr = _scores(x)
    return bool(np.all((arr == 0) | (arr == 1)))


def compare(correct_a: torch.Tensor | np.ndarray | Sequence[bool], correct_b: torch.Tensor | np.ndarray | Sequence[bool],
            *, a: str = "a", b: str = "b", rounds: int = 10_000, seed: int = 0) -> Comparison:
    """Paired test of two sets of per-example outcomes on the same test points.

    ``(n,)`` 0/1 outcomes each: exact McNemar. ``(S, n)`` each (S seeds, same n points in the
    same order): :func:`two_level_test`. Scores in [0, 1] that are not all 0/1 (a point's
    accuracy averaged over an ε grid, or a bar built from other rows) take the two-level test
    also for ``(n,)`` (one seed: its point level, a paired sign-flip permutation test)."""
    binary = is_binary(correct_a) and is_binary(correct_b)
    fa, fb = (_flags(correct_a), _flags(correct_b)) if binary else (_scores(correct_a), _scores(correct_b))
    if fa.shape != fb.shape:
        raise ValueError(f"paired outcomes must have the same shape, got {fa.shape} and {fb.shape}")
    if binary and fa.ndim == 1:
        only_a, only_b = int((fa & ~fb).sum()), int((~fa & fb).sum())
        return Comparison(a=a, b=b, diff=float(fa.mean() - fb.mean()), p_value=mcnemar_exact_p(only_a, only_b),
                          test="mcnemar-exact", n=int(fa.size), only_a=only_a, only_b=only_b)
    da, db = fa.astype(float), fb.astype(float)
    da, db = (da.reshape(1, -1), db.reshape(1, -1)) if da.ndim == 1 else (da, db)
    if da.ndim != 2:
        raise ValueError(f"outcomes must be (n,) or (seeds, n), got shape {fa.shape}")
    p = two_level_test(da - db, rounds=rounds, seed=seed)
    return Comparison(a=a, b=b, diff=float((da - db).mean()), p_value=p,
                      test="two-level" if da.shape[0] > 1 else "sign-flip", n=int(da.shape[1]), seeds=int(da.shape[0]))


def two_level_test(diff: np.ndarray, *, rounds: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of H₀ "the two methods are equally accurate" from paired differences
    ``diff`` ``(S, n)``: d[s, i] = score of method a minus method b, seed s, test point i.

    The statistic is T = the mean of d (the difference of seed-mean accuracies). Under H₀ its
    deviation from 0 has two sources, and the null distribution resamples both (our choice,
    reasoned):

    1. **Which test points** (the point level): a paired **sign-flip permutation** of the
       per-point seed-mean differences d̄ᵢ — under H₀ the two methods are exchangeable on each
       point, so each d̄ᵢ is as likely to carry either sign. For 0/1 outcomes of one seed this is
       the exact McNemar distribution (conditional on the discordant points), so a handful of
       discordant images gives McNemar's p (four all one way: 0.125), not the percentile
       bootstrap's 2·e^(−b) (0.034), which is anti-conservative when few points disagree.
    2. **Which training seeds** (the seed level): the per-seed differences Dₛ = mean over i of
       d[s, i], centred on their mean and inflated by √(S/(S − 1)) (so the draws' variance is the
       unbiased one), resampled with replacement: a model's accuracy depends on its training
       seed, and a claim about the *method* must carry that variance. A test that keeps the
       seeds fixed (e.g. a bootstrap over points only) speaks about these trained models.

    A null draw is T* = (mean of S resampled centred Dₛ) + (1/n)·Σᵢ εᵢ·d̄ᵢ with εᵢ = ±1, and
    p = (1 + #{|T*| ≥ |T|}) / (B + 1) (the +1 correction of a Monte-Carlo p-value, Davison &
    Hinkley 1997, §4.2: never 0; ≥ 1/(B + 1)). With all seeds identical the seed level
    vanishes and this is exact McNemar up to Monte-Carlo error; with one seed of four
    discordant points and two seeds of none, the seed level's spread keeps p far above α.
    (Seed-level sign flips alone would be a fully exact seed-level test, but with 3 seeds their
    smallest p is 2/2³ = 0.25: no claim could ever be made.)"""
    d = np.asarray(diff, dtype=float)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"differences must be (seeds, n), got shape {d.shape}")
    s, n = d.shape
    observed = float(d.mean())
    per_point = d.mean(axis=0)  # (n,) d̄ᵢ
    per_seed = d.mean(axis=1)  # (S,) Dₛ
    if np.all(per_point == 0) and np.all(per_seed == per_seed.mean()):
        return 1.0
    centred = (per_seed - per_seed.mean()) * (math.sqrt(s / (s - 1)) if s > 1 else 0.0)
    rng = np.random.default_rng(seed)
    moving = per_point[per_point != 0]  # only the non-zero d̄ᵢ change T* when flipped
    hits = 0
    for start in range(0, rounds, 1000):  # chunks keep the (rounds, n) sign matrix small
        k = min(1000, rounds - start)
        signs = rng.integers(0, 2, size=(k, moving.size)) * 2 - 1
        t = signs @ moving / n  # (k,) point-level draws
        if s > 1:
            t = t + centred[rng.integers(0, s, size=(k, s))].mean(axis=1)
        # a relative slack so that a draw equal to |T| in exact arithmetic counts as a hit
        hits += int((np.abs(t) >= abs(observed) * (1 - 1e-9) - 1e-15).sum())
    return min(1.0, (hits + 1) / (rounds + 1))
