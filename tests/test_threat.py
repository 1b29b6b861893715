"""Property tests (hypothesis) for the threat model: projection, random start, ε parsing.

References are independent of gradreg: explicit norms in float64 numpy-style torch code and a
bisection for the ℓ1 projection's threshold.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradreg.threat import ThreatModel, flat_norm, parse_eps

NORMS = ("linf", "l2", "l1")
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def problems(draw):  # type: ignore[no-untyped-def]
    """(threat, x, x_adv): x inside random bounds, x_adv anywhere near them, float64."""
    norm = draw(st.sampled_from(NORMS))
    lo = draw(st.floats(-2.0, 1.0))
    hi = lo + draw(st.floats(0.1, 3.0))
    eps = draw(st.one_of(st.just(0.0), st.floats(1e-3, 4.0)))
    n = draw(st.integers(1, 4))
    d = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand((n, 1, d), generator=gen, dtype=torch.float64)
    if draw(st.booleans()):  # many pixels exactly on the bounds, as in real images
        x = torch.where(torch.rand(x.shape, generator=gen, dtype=torch.float64) < 0.5, torch.full_like(x, lo), x)
    spread = draw(st.floats(0.01, 5.0))
    x_adv = x + spread * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return ThreatModel(norm, eps, (lo, hi)), x, x_adv


def _ref_norm(z: torch.Tensor, norm: str) -> torch.Tensor:
    z = z.reshape(z.shape[0], -1)
    p = {"linf": math.inf, "l2": 2.0, "l1": 1.0}[norm]
    return torch.linalg.vector_norm(z, ord=p, dim=1)


def _feasible(threat: ThreatModel, x: torch.Tensor, p: torch.Tensor, tol: float = 1e-9) -> bool:
    in_ball = bool((_ref_norm(p - x, threat.norm) <= threat.eps * (1 + 1e-9) + tol).all())
    in_box = bool(((p >= threat.lo - tol) & (p <= threat.hi + tol)).all())
    return in_ball and in_box


@SETTINGS
@given(problems())
def test_project_lands_in_ball_and_box(problem) -> None:  # type: ignore[no-untyped-def]
    threat, x, x_adv = problem
    assert _feasible(threat, x, threat.project(x, x_adv))


@SETTINGS
@given(problems())
def test_project_is_idempotent(problem) -> None:  # type: ignore[no-untyped-def]
    threat, x, x_adv = problem
    once = threat.project(x, x_adv)
    twice = threat.project(x, once)
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-9)


@SETTINGS
@given(problems(), st.floats(0.0, 1.0))
def test_project_is_identity_on_feasible_points(problem, shrink) -> None:  # type: ignore[no-untyped-def]
    threat, x, x_adv = problem
    delta = x_adv - x
    size = _ref_norm(delta, threat.norm).clamp_min(1e-12).view(-1, 1, 1)
    # a point strictly inside the ball, then clipped (clipping towards x only shrinks δ)
    inside = (x + delta / size * threat.eps * shrink * 0.999).clamp(threat.lo, threat.hi)
    assert _feasible(threat, x, inside)
    torch.testing.assert_close(threat.project(x, inside), inside, rtol=0, atol=1e-12)


@SETTINGS
@given(problems())
def test_l1_projection_is_euclidean_projection(problem) -> None:  # type: ignore[no-untyped-def]
    """Without the box, the ℓ1 projection is sign(v)·max(|v| − θ, 0) with Σ max(|v| − θ, 0) = ε;
    θ found here by bisection (independent of the sort-based formula under test)."""
    threat, x, x_adv = problem
    big = ThreatModel("l1", threat.eps, (-1e9, 1e9))
    got = big.project(x, x_adv) - x
    v = (x_adv - x).reshape(x.shape[0], -1)
    for i in range(v.shape[0]):
        a = v[i].abs()
        if a.sum() <= threat.eps:
            expected = v[i]
        else:
            lo_t, hi_t = 0.0, float(a.max())
            for _ in range(200):
                mid = (lo_t + hi_t) / 2
                if float((a - mid).clamp_min(0).sum()) > threat.eps:
                    lo_t = mid
                else:
                    hi_t = mid
            expected = v[i].sign() * (a - hi_t).clamp_min(0)
        torch.testing.assert_close(got[i].reshape(-1), expected, rtol=0, atol=1e-7)


@SETTINGS
@given(problems())
def test_random_start_is_feasible(problem) -> None:  # type: ignore[no-untyped-def]
    threat, x, _ = problem
    start = threat.random_start(x, torch.Generator().manual_seed(0))
    assert _feasible(threat, x, start)


@SETTINGS
@given(problems())
def test_normalize_has_unit_norm(problem) -> None:  # type: ignore[no-untyped-def]
    threat, x, x_adv = problem
    g = x_adv - x
    d = threat.normalize(g)
    nonzero = _ref_norm(g, "linf") > 0
    torch.testing.assert_close(_ref_norm(d, threat.norm)[nonzero], torch.ones(int(nonzero.sum()), dtype=d.dtype))
    # steepest ascent: ⟨g, d⟩ equals the dual norm of g
    dual = {"linf": "l1", "l2": "l2", "l1": "linf"}[threat.norm]
    torch.testing.assert_close((g * d).reshape(len(g), -1).sum(1), _ref_norm(g, dual))


def test_flat_norm_matches_reference() -> None:
    z = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    for norm in NORMS:
        torch.testing.assert_close(flat_norm(z, norm), _ref_norm(z, norm))


@pytest.mark.parametrize("text,value", [("0", 0.0), ("0.1", 0.1), ("8/255", 8 / 255), ("8 / 255", 8 / 255), (0.3, 0.3)])
def test_parse_eps(text, value) -> None:  # type: ignore[no-untyped-def]
    assert parse_eps(text) == pytest.approx(value, rel=0, abs=1e-15)


@pytest.mark.parametrize("text", ["-0.1", "abc", "1/0", "nan", "inf"])
def test_parse_eps_rejects(text) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        parse_eps(text)


def test_projection_keeps_the_input_layout() -> None:
    """A perturbed batch runs through the model in the clean batch's memory format."""
    from gradreg.threat import same_layout

    x = torch.rand(4, 28, 28, 1).permute(0, 3, 1, 2)  # (N, 1, H, W) with channels-last strides
    noisy = (x + 0.1 * torch.randn(4, 1, 28, 28)).contiguous()  # NCHW strides
    for norm in ("linf", "l2", "l1"):
        out = ThreatModel(norm, 0.05, (0.0, 1.0)).project(x, noisy)
        assert out.stride() == x.stride()
    x3 = torch.rand(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    moved = same_layout(x3.contiguous(), x3)
    assert moved.stride() == x3.stride() and torch.equal(moved, x3)
