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


def test_two_level_test_over_seeds() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((3, 400)) < 0.9
    same = stats.compare(a, a.copy())
    assert same.p_value == 1.0 and not same.significant
    b = a.copy()
    b[:, :60] = False  # b loses 60 points in every seed
    res = stats.compare(a, b, a="x", b="y")
    assert res.test == "two-level" and res.significant and res.seeds == 3
    assert res.diff == pytest.approx(float(a[:, :60].mean(axis=0).sum()) / 400)


def _planted(shape: tuple[int, int], wins: dict[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(S, n) outcomes of B (random, 70 % right) and A = B except that A is right, B wrong, on
    ``wins[s]`` points of seed s (different points per seed)."""
    rng = np.random.default_rng(seed)
    b = rng.random(shape) < 0.7
    a = b.copy()
    for s, k in wins.items():
        wrong = np.flatnonzero(~b[s])[:k]
        a[s, wrong] = True
    return a, b


def test_four_discordant_points_in_one_seed_are_not_significant() -> None:
    a, b = _planted((3, 200), {0: 4})
    res = stats.compare(a, b, a="A", b="B")
    assert res.test == "two-level" and res.diff > 0 and not res.significant
    # the one seed alone: exact McNemar with 4 discordant points all one way, 2·2⁻⁴ = 0.125
    one = stats.compare(a[0], b[0])
    assert one.p_value == pytest.approx(0.125) and not one.significant


def test_twenty_points_in_every_seed_are_significant() -> None:
    a, b = _planted((3, 200), {0: 20, 1: 20, 2: 20})
    res = stats.compare(a, b, a="A", b="B")
    assert res.test == "two-level" and res.p_value < 0.01 and res.significant
    assert res.diff == pytest.approx(0.1)


@pytest.mark.parametrize("wins,losses", [(4, 0), (6, 1), (9, 3), (12, 12)])
def test_two_level_with_identical_seeds_is_mcnemar(wins: int, losses: int) -> None:
    """Identical seeds: no seed-level spread, the point level is McNemar's exact distribution."""
    b = np.zeros(200, dtype=bool)
    b[:100] = True
    a = b.copy()
    a[100:100 + wins] = True
    a[:losses] = False
    exact = stats.mcnemar_exact_p(wins, losses)
    p = stats.compare(np.stack([a] * 3), np.stack([b] * 3), rounds=20_000).p_value
    # Monte-Carlo error of a p estimated from 20,000 draws: ≤ 4 standard errors
    assert p == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 20_000) + 2e-4)


def test_holm_on_hand_worked_p_values() -> None:
    # sorted 0.01, 0.02, 0.03, 0.04, 0.5 with m = 5: ×5, ×4, ×3, ×2, ×1 = 0.05, 0.08, 0.09, 0.08, 0.5,
    # then the running maximum keeps them monotone: 0.05, 0.08, 0.09, 0.09, 0.5 (given order below)
    p = [0.03, 0.5, 0.01, 0.04, 0.02]
    assert stats.holm(p) == pytest.approx([0.09, 0.5, 0.05, 0.09, 0.08])
    assert stats.holm([0.3, 0.4]) == pytest.approx([0.6, 0.6])
    assert stats.holm([]) == []


def test_family_adjustment_is_shown_and_decides() -> None:
    a, b = np.ones(200, dtype=bool), np.ones(200, dtype=bool)
    b[:8] = False  # 8 discordant, all one way: p = 2⁻⁷ = 0.0078
    single = stats.compare(a, b, a="A", b="B")
    assert single.significant
    family = stats.adjust_family([single] + [stats.compare(a, a)] * 9)
    assert family[0].p_value == pytest.approx(2 ** -7) and family[0].p_adjusted == pytest.approx(10 * 2 ** -7)
    assert not family[0].significant and "Holm-adjusted 0.078 over 10" in family[0].wording()


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


def test_compare_takes_the_sign_flip_test_for_graded_scores() -> None:
    a = np.full(100, 0.5)
    b = a.copy()
    b[:60] = 1.0  # b is better on 60 points, never worse: P(all 60 signs alike) = 2⁻⁵⁹
    cmp = stats.compare(b, a, a="b", b="a", rounds=2000)
    # no draw reaches |T|: the smallest p that 2000 draws can give, 1/2001, never a bare 0
    assert cmp.test == "sign-flip" and cmp.p_value == pytest.approx(1 / 2001) and cmp.diff == pytest.approx(0.3)
    assert "p = 0.0005" in cmp.wording()
    same = stats.compare(a, a, rounds=200)
    assert same.p_value == 1.0 and "not distinguishable" in same.wording()


def test_relative_cost_interval_comes_from_the_rounds_and_says_on_the_edge() -> None:
    from gradreg.cost import StepCost, relative_cost

    rng = np.random.default_rng(0)
    ref = rng.normal(9.0, 0.3, size=10)  # per-round ratios of the reference (× clean)
    row = rng.normal(3.15, 0.2, size=10)
    cost = StepCost(ratio=float(np.median(row)), lo=0, hi=0, seconds=0, rounds=10, ratios=tuple(row))
    refc = StepCost(ratio=float(np.median(ref)), lo=0, hi=0, seconds=0, rounds=10, ratios=tuple(ref))
    rel = relative_cost(cost, refc)
    assert rel.value == pytest.approx(np.median(row) / np.median(ref))
    assert rel.interval is not None and rel.interval[0] < rel.value < rel.interval[1]
    assert rel.versus(rel.value) == "on the edge of"  # a bar inside the interval
    assert rel.versus(rel.interval[1] + 0.01) == "within" and rel.versus(rel.interval[0] - 0.01) == "over"
    old = StepCost.from_dict({"ratio": 3.0, "lo": 2.9, "hi": 3.1, "seconds": 0.1, "rounds": 10, "measured": None})
    assert relative_cost(old, refc).interval is None and "not measured" in relative_cost(old, refc).text()
