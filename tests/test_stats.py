"""Intervals and paired tests against independent computations (scipy, root finding by hand)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest
from scipy.stats import t as student_t

from gradreg import stats


def _wilson_by_root_finding(k: int, n: int, z: float = stats.Z95) -> tuple[float, float]:
    """The Wilson interval's definition: the p with |k/n − p| = z·√(p(1−p)/n), found by bisection."""
    phat = k / n
    f = lambda p: abs(phat - p) - z * math.sqrt(p * (1 - p) / n)  # noqa: E731 (< 0 inside the interval)

    def bisect(inside: float, outside: float) -> float:  # f(inside) < 0 ≤ f(outside)
        for _ in range(200):
            m = (inside + outside) / 2
            inside, outside = (m, outside) if f(m) < 0 else (inside, m)
        return (inside + outside) / 2

    centre = min(max(phat, 1e-12), 1 - 1e-12)  # strictly inside (0, 1), where f < 0
    lo = 0.0 if k == 0 else bisect(centre, 0.0)
    hi = 1.0 if k == n else bisect(centre, 1.0)
    return lo, hi


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (81, 263), (487, 500), (1999, 2000)])
def test_wilson_matches_its_definition(k: int, n: int) -> None:
    lo, hi = stats.wilson_interval(k, n)
    rlo, rhi = _wilson_by_root_finding(k, n)
    assert lo == pytest.approx(rlo, abs=1e-9) and hi == pytest.approx(rhi, abs=1e-9)


def test_wilson_matches_scipy() -> None:
    ci = binomtest(81, 263).proportion_ci(confidence_level=0.95, method="wilson")
    assert stats.wilson_interval(81, 263) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_rejects_bad_counts() -> None:
    with pytest.raises(ValueError):
        stats.wilson_interval(3, 0)
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)


def test_proportion_from_flags() -> None:
    iv = stats.proportion(np.array([1, 1, 0, 1] * 25, dtype=bool))
    assert (iv.value, iv.n) == (0.75, 100)
    assert (iv.lo, iv.hi) == pytest.approx(stats.wilson_interval(75, 100))
    assert iv.text() == f"75.0 [{100 * iv.lo:.1f}, {100 * iv.hi:.1f}]"


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (3, 9), (10, 10), (40, 17), (900, 1000)])
def test_mcnemar_exact_matches_scipy_binomtest(b: int, c: int) -> None:
    expected = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    assert stats.mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-9)


def test_compare_counts_discordant_points_and_words_the_outcome() -> None:
    base = np.ones(500, dtype=bool)
    a = base.copy()
    b = base.copy()
    b[:30] = False  # a beats b on 30 points
    a[30:32] = False  # b beats a on 2
    res = stats.compare(a, b, a="SGR", b="GN")
    assert (res.only_a, res.only_b, res.test) == (30, 2, "mcnemar-exact")
    assert res.diff == pytest.approx(28 / 500)
    assert res.significant and res.wording().startswith("SGR is more accurate than GN by 5.6 points")
    close = b.copy()
    close[:30] = True
    close[40:43] = False  # 3 vs 2 discordant points
    res = stats.compare(a, close, a="SGR", b="GN")
    assert not res.significant and "not distinguishable at this n" in res.wording()


def test_paired_bootstrap_over_seeds() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((3, 400)) < 0.9
    same = stats.compare(a, a.copy())
    assert same.p_value == 1.0 and not same.significant
    b = a.copy()
    b[:, :60] = False  # b loses 60 points in every seed
    res = stats.compare(a, b, a="x", b="y")
    assert res.test == "paired-bootstrap" and res.significant
    assert res.diff == pytest.approx(float(a[:, :60].mean(axis=0).sum()) / 400)


def test_over_seeds_combines_seed_and_test_error() -> None:
    accs = [0.90, 0.92, 0.94]
    iv = stats.over_seeds(accs, 500)
    mean, sd = float(np.mean(accs)), float(np.std(accs, ddof=1))
    seed_half = student_t.ppf(0.975, 2) * sd / math.sqrt(3)
    lo_w, hi_w = _wilson_by_root_finding(round(mean * 500), 500)
    half = math.hypot(seed_half, (hi_w - lo_w) / 2)
    assert (iv.value, iv.seeds, iv.spread) == (pytest.approx(mean), 3, pytest.approx(sd))
    assert (iv.lo, iv.hi) == (pytest.approx(mean - half), pytest.approx(mean + half))
    one = stats.over_seeds([0.9], 500)
    assert (one.lo, one.hi) == pytest.approx(stats.wilson_interval(450, 500))


def test_mean_score_is_wilson_for_outcomes_and_never_narrower_than_the_normal_interval() -> None:
    flags = np.array([1] * 37 + [0] * 13)
    assert stats.mean_score(flags) == stats.proportion(flags.astype(bool))
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 10, size=300) / 9  # a point's accuracy averaged over a 9-point ε grid
        iv = stats.mean_score(scores)
        normal_half = stats.Z95 * scores.std(ddof=1) / math.sqrt(scores.size)
        assert iv.lo <= scores.mean() <= iv.hi
        assert (iv.hi - iv.lo) / 2 >= normal_half * 0.99  # Bhatia–Davis: Var ≤ μ(1 − μ)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.mean_score([0.5, 1.5])


def test_compare_takes_the_paired_bootstrap_for_graded_scores() -> None:
    a = np.full(100, 0.5)
    b = a.copy()
    b[:60] = 1.0  # b is better on 60 points, never worse: the bootstrap never draws a difference ≤ 0
    cmp = stats.compare(b, a, a="b", b="a", rounds=2000)
    # no draw reaches 0: the smallest p that 2000 draws can give, 2·1/2001, never a bare 0
    assert cmp.test == "paired-bootstrap" and cmp.p_value == pytest.approx(2 / 2001) and cmp.diff == pytest.approx(0.3)
    assert "p = 0.001" in cmp.wording()
    same = stats.compare(a, a, rounds=200)
    assert same.p_value == 1.0 and "not distinguishable" in same.wording()
