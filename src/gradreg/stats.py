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
- Paired comparison over seeds: a **paired bootstrap over test points** (our choice): the
  points are resampled with replacement jointly for every seed of both methods, the statistic
  is the difference of seed-mean accuracies, and the two-sided p-value is twice the smaller
  tail mass beyond 0, with the usual +1 correction of a Monte-Carlo p-value (never 0: at
  least 2/(B + 1) for B draws).

A difference is stated only when its test gives p < α (0.05); otherwise reports say "not
distinguishable at this n".
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    test: str  # "mcnemar-exact" or "paired-bootstrap"
    n: int
    only_a: int | None = None  # points a gets right and b wrong (McNemar's b)
    only_b: int | None = None

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    def wording(self) -> str:
        """The sentence a report may print about this difference."""
        if not self.significant:
            return (f"{self.a} vs {self.b}: not distinguishable at this n "
                    f"(difference {100 * self.diff:+.1f} points, {self.test} p = {self.p_value:.2g}, n = {self.n})")
        better, worse = (self.a, self.b) if self.diff > 0 else (self.b, self.a)
        return (f"{better} is more accurate than {worse} by {100 * abs(self.diff):.1f} points "
                f"({self.test} p = {self.p_value:.2g}, n = {self.n})")

    def as_dict(self) -> dict[str, object]:
        return {"a": self.a, "b": self.b, "diff": self.diff, "p_value": self.p_value, "test": self.test,
                "n": self.n, "only_a": self.only_a, "only_b": self.only_b, "significant": self.significant}


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

    ``(n,)`` each: exact McNemar. ``(S, n)`` each (S seeds, same n points in the same order):
    paired bootstrap over points of the difference of seed-mean accuracies. Scores in [0, 1]
    that are not all 0/1 (e.g. a point's accuracy averaged over an ε grid) take the paired
    bootstrap also for ``(n,)`` (as one seed)."""
    if not (is_binary(correct_a) and is_binary(correct_b)):
        fa, fb = _scores(correct_a), _scores(correct_b)
        if fa.shape != fb.shape:
            raise ValueError(f"paired outcomes must have the same shape, got {fa.shape} and {fb.shape}")
        return _bootstrap(fa.reshape(1, -1) if fa.ndim == 1 else fa, fb.reshape(1, -1) if fb.ndim == 1 else fb,
                          a=a, b=b, rounds=rounds, seed=seed)
    fa, fb = _flags(correct_a), _flags(correct_b)
    if fa.shape != fb.shape:
        raise ValueError(f"paired outcomes must have the same shape, got {fa.shape} and {fb.shape}")
    if fa.ndim == 1:
        only_a, only_b = int((fa & ~fb).sum()), int((~fa & fb).sum())
        return Comparison(a=a, b=b, diff=float(fa.mean() - fb.mean()), p_value=mcnemar_exact_p(only_a, only_b),
                          test="mcnemar-exact", n=int(fa.size), only_a=only_a, only_b=only_b)
    return _bootstrap(fa.astype(float), fb.astype(float), a=a, b=b, rounds=rounds, seed=seed)


def _bootstrap(fa: np.ndarray, fb: np.ndarray, *, a: str, b: str, rounds: int, seed: int) -> Comparison:
    """Paired bootstrap over points of ``(S, n)`` scores (see :func:`compare`)."""
    if fa.ndim != 2:
        raise ValueError(f"outcomes must be (n,) or (seeds, n), got shape {fa.shape}")
    n = fa.shape[1]
    per_point = fa.mean(axis=0) - fb.mean(axis=0)  # (n,) seed-mean difference per test point
    observed = float(per_point.mean())
    rng = np.random.default_rng(seed)
    draws = np.empty(rounds)
    for start in range(0, rounds, 1000):  # chunks keep the (rounds, n) index matrix small
        idx = rng.integers(0, n, size=(min(1000, rounds - start), n))
        draws[start:start + idx.shape[0]] = per_point[idx].mean(axis=1)
    if np.all(per_point == 0):
        p = 1.0
    else:
        # two-sided Monte-Carlo p-value with the +1 correction (Davison & Hinkley 1997, §4.2):
        # never 0 — with B draws the smallest p it can report is 2/(B + 1)
        tail = min(int((draws <= 0).sum()), int((draws >= 0).sum()))
        p = min(1.0, 2 * (tail + 1) / (rounds + 1))
    return Comparison(a=a, b=b, diff=observed, p_value=p, test="paired-bootstrap", n=int(n))
