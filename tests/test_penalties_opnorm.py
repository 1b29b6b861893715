"""Operator-norm regularization: the power method against an explicit Jacobian (full SVD for
(2, 2), brute force over sign vectors for (∞, 2)), warm start, both penalty forms, gradcheck,
the adversarial-training counterpart, the global spectral-norm baseline, mode hygiene."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from gradreg.penalties import CleanPass, make
from gradreg.penalties.opnorm import power_method


def relu_mlp(d: int = 8, k: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, k)).double().eval()


def bn_net() -> nn.Module:
    """Conv + BatchNorm (2d, 1d) on (N, 1, 6, 6), 3 classes, with non-trivial running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 1, 6, 6))
    return model


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


class TanhNet(nn.Module):
    """f(x) = tanh(x W₁) W₂ with the weights as plain tensors, so gradcheck can vary them."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor) -> None:
        super().__init__()
        self.w1, self.w2 = w1, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ self.w1) @ self.w2


def jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Explicit per-sample Jacobians ``(N, K, d)`` by reverse mode, one sample at a time."""
    return torch.stack([torch.func.jacrev(lambda xi: model(xi[None])[0])(xi).flatten(1) for xi in x])


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1), b.flatten(1)
    return (a * b).sum(1).abs() / (a.norm(dim=1) * b.norm(dim=1))


@pytest.mark.parametrize("which", ["mlp", "conv-bn"])
def test_power_method_matches_svd(which: str) -> None:
    if which == "mlp":
        model, x = relu_mlp(), torch.rand(6, 8, dtype=torch.float64)
    else:
        model, x = bn_net().double().eval(), torch.rand(6, 1, 6, 6, dtype=torch.float64)
    res = power_method(model, x, norm="l2", out_norm="l2", iterations=200)
    u_ref, s_ref, vh_ref = torch.linalg.svd(jacobians(model, x))
    torch.testing.assert_close(res.sigma, s_ref[:, 0], rtol=1e-8, atol=0)
    assert bool((cos(res.v, vh_ref[:, 0]) > 1 - 1e-8).all())
    assert bool((cos(res.u, u_ref[:, :, 0]) > 1 - 1e-8).all())
    torch.testing.assert_close(res.v.flatten(1).norm(dim=1), torch.ones(6, dtype=torch.float64))


def test_power_method_linf_matches_brute_force() -> None:
    d = 8
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=torch.float64)  # (2^d, d)
    for seed in range(3):
        model, x = relu_mlp(d=d, k=3, seed=seed), torch.rand(6, d, dtype=torch.float64)
        jac = jacobians(model, x)  # (N, K, d)
        brute = (signs @ jac.transpose(1, 2)).norm(dim=2).amax(dim=1)  # max over sign vectors of ‖Jv‖₂
        best = torch.zeros(6, dtype=torch.float64)
        for restart in range(8):
            torch.manual_seed(100 * seed + restart)
            res = power_method(model, x, norm="linf", out_norm="l2", iterations=10)
            assert bool((res.v.abs() == 1).all())  # ψ_1 = sign: a vertex of the ℓ∞ ball
            assert bool((res.sigma <= brute * (1 + 1e-12)).all())
            # a fixed point of v = sign(Jᵀ Jv/‖Jv‖), checked on the explicit Jacobian
            jv = torch.einsum("nkd,nd->nk", jac, res.v)
            assert torch.equal(torch.einsum("nkd,nk->nd", jac, jv).sign(), res.v)
            torch.testing.assert_close(res.sigma, jv.norm(dim=1))
            best = torch.maximum(best, res.sigma)
        torch.testing.assert_close(best, brute, rtol=1e-10, atol=0)


def test_penalty_forms_match_svd() -> None:
    model, x = relu_mlp(), 0.2 + 0.6 * torch.rand(6, 8, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)
    half_sq = 0.5 * (torch.linalg.svdvals(jacobians(model, x))[:, 0] ** 2).mean()
    ujv = make("opnorm", form="uJv", iterations=100)(model, x, y)
    torch.testing.assert_close(ujv, half_sq, rtol=1e-8, atol=0)
    eps = 1e-4
    sos = make("opnorm", form="sos", eps=eps, iterations=100)(model, x, y)
    torch.testing.assert_close(sos / eps**2, half_sq, rtol=1e-6, atol=0)  # ReLU net: linear near x


@pytest.mark.parametrize("form,eps", [("uJv", 0.5), ("sos", 1e-4)])
def test_gradcheck_float64(form: str, eps: float) -> None:
    """With u, v at the top singular pair, ½σ² has gradient σ·uᵀ(∂J)v (Danskin): detaching u, v
    is exact there, so finite differences of the whole penalty must agree with autograd."""
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    w2 = torch.randn(3, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    x = torch.rand(2, 4, generator=gen, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    pen = make("opnorm", form=form, eps=eps, iterations=300)

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # same start, so v has the same sign in every evaluation
        return pen(TanhNet(a, b), x, y) / (eps**2 if form == "sos" else 1.0)

    assert torch.autograd.gradcheck(fn, (w1, w2))


def test_warm_start_converges_to_cold_estimate() -> None:
    model = relu_mlp()
    train_x = torch.rand(12, 8, dtype=torch.float64)
    y = torch.zeros(12, dtype=torch.long)
    pen = make("opnorm", form="uJv", warm_start=True)
    assert pen.iterations == 1
    pen.setup(model, train_x)
    halves = [torch.arange(0, 6), torch.arange(6, 12)]

    def epoch() -> None:
        for idx in halves:
            pen(model, train_x[idx], y[idx], ctx=CleanPass(model, train_x[idx], y[idx], index=idx))

    ref = power_method(model, train_x, iterations=200)
    epoch()
    assert pen.u_buf.shape == (12, 3)  # K numbers per example
    assert float(cos(pen.u_buf, ref.u).min()) < 0.999  # one iteration from a random start is not enough
    for _ in range(25):
        epoch()
    assert bool((cos(pen.u_buf, ref.u) > 1 - 1e-6).all())
    warm = power_method(model, train_x, iterations=1, u0=pen.u_buf)  # what the next step computes
    assert bool((cos(warm.v, ref.v) > 1 - 1e-6).all())
    cold10 = power_method(model, train_x, iterations=10).sigma
    torch.testing.assert_close(warm.sigma, cold10, rtol=1e-4, atol=0)
    torch.testing.assert_close(warm.sigma, ref.sigma, rtol=1e-6, atol=0)


def test_output_space_start_is_one_half_iteration() -> None:
    """From u0, v = ψ(Jᵀu0) then u = ψ(Jv): the same as an input-space start at v0 = Jᵀu0."""
    model = relu_mlp()
    x = torch.rand(5, 8, dtype=torch.float64)
    u0 = torch.randn(5, 3, dtype=torch.float64)
    jac = torch.func.vmap(torch.func.jacrev(model))(x)  # (N, K, d)
    v0 = torch.einsum("nkd,nk->nd", jac, u0 / u0.norm(dim=1, keepdim=True))
    for k in (1, 3):
        a = power_method(model, x, iterations=k, u0=u0)
        b = power_method(model, x, iterations=k - 1, v0=v0) if k > 1 else None
        want_v = v0 / v0.norm(dim=1, keepdim=True) if b is None else b.v
        torch.testing.assert_close(a.v, want_v)
        jv = torch.einsum("nkd,nd->nk", jac, a.v)
        torch.testing.assert_close(a.sigma, jv.norm(dim=1))
    with pytest.raises(ValueError, match="iterations ≥ 1"):
        power_method(model, x, iterations=0, u0=u0)


def test_warm_start_state_is_checkpointed_and_deterministic() -> None:
    model = relu_mlp()
    train_x = torch.rand(10, 8, dtype=torch.float64)
    y = torch.zeros(10, dtype=torch.long)
    a, b = make("opnorm", warm_start=True, eps=0.1), make("opnorm", warm_start=True, eps=0.1)
    a.setup(model, train_x)
    b.setup(model, train_x)
    idx = torch.arange(3, 7)
    a(model, train_x[idx], y[idx], ctx=CleanPass(model, train_x[idx], y[idx], index=idx))
    state = a.state_dict()
    assert set(state) == {"u_buf"} and state["u_buf"].shape == (10, 3)
    fresh = make("opnorm", warm_start=True, eps=0.1)
    fresh.setup(model, train_x)
    fresh.load_state_dict(state)  # before its first step: the buffer takes the checkpoint's shape
    assert torch.equal(fresh.u_buf, a.u_buf)
    # the initial draw is seeded: a second penalty starts from the same u, so equal steps agree
    b(model, train_x[idx], y[idx], ctx=CleanPass(model, train_x[idx], y[idx], index=idx))
    assert torch.equal(a.u_buf, b.u_buf)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[idx] = False
    c = make("opnorm", warm_start=True, eps=0.1)
    c.setup(model, train_x)
    c(model, train_x[:2], y[:2], ctx=CleanPass(model, train_x[:2], y[:2], index=torch.arange(2)))
    assert torch.equal(a.u_buf[untouched & (torch.arange(10) >= 2)], c.u_buf[untouched & (torch.arange(10) >= 2)])
    assert not torch.equal(a.u_buf[idx], c.u_buf[idx])  # written back where the step ran
    with pytest.raises(RuntimeError, match="ctx.index"):
        a(model, train_x[idx], y[idx])


@pytest.mark.parametrize("rel_stepsize", [1.0, 100.0])  # the default, and the α → ∞ regime
def test_opnorm_at_perturbation_aligns_with_top_singular_vector(rel_stepsize: float) -> None:
    model = relu_mlp()
    x = 0.3 + 0.4 * torch.rand(6, 8, dtype=torch.float64)  # away from the bounds
    y = torch.zeros(6, dtype=torch.long)
    eps = 1e-3
    pen = make("opnorm-at", eps=eps, rel_stepsize=rel_stepsize)
    torch.manual_seed(0)
    x_adv = pen.attack(model, x)
    vh = torch.linalg.svd(jacobians(model, x)).Vh[:, 0]  # (N, d), independent of the power method
    assert bool((cos(x_adv - x, vh) > 0.99).all())
    torch.testing.assert_close((x_adv - x).norm(dim=1), torch.full((6,), eps, dtype=torch.float64))
    # and the penalty is ½‖J δ‖² ≈ ½ε²σ² there
    s = torch.linalg.svdvals(jacobians(model, x))[:, 0]
    torch.manual_seed(0)
    value = pen(model, x, y)
    torch.testing.assert_close(value / eps**2, 0.5 * (s**2).mean(), rtol=1e-3, atol=0)


def snr_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 7), nn.ReLU(),
                         nn.Linear(7, 3)).double()


def test_snr_matches_full_svd_value_and_gradient() -> None:
    model = snr_net()
    x, y = torch.rand(2, 2, 6, 6, dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    pen = make("snr")
    assert pen.input_dependent is False
    for _ in range(600):  # one iteration per call; the slowest layer has σ₂/σ₁ ≈ 0.97
        value = pen(model, x, y)
    weights = [model[0].weight, model[3].weight, model[5].weight]
    ref = 0.5 * sum(torch.linalg.matrix_norm(w.flatten(1), ord=2) ** 2 for w in weights)
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=0)
    got = torch.autograd.grad(value, weights)
    want = torch.autograd.grad(ref, weights)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_snr_state_round_trip_after_setup() -> None:
    """setup(model, …) allocates the state; a checkpoint then loads before the first call, and
    state of another architecture fails with a clear message."""
    model = snr_net()
    x, y = torch.rand(2, 2, 6, 6, dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    a = make("snr")
    a.setup(model, x)
    for _ in range(3):
        a(model, x, y)
    state = a.state_dict()
    assert sorted(state) == ["u0", "u1", "u2"] and state["u0"].shape == (5,)
    b = make("snr")
    b.setup(model, x)
    b.load_state_dict(state)  # before b's first call
    torch.testing.assert_close(b(model, x, y), a(model, x, y), rtol=0, atol=0)
    fresh = make("snr")
    fresh.setup(model, x)
    assert not torch.equal(fresh(model, x, y), b(model, x, y))  # the state mattered
    other = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2), nn.Linear(2, 2)).double()
    c = make("snr")
    c.load_state_dict(state, strict=False)  # not set up: the buffers do not exist yet
    c.setup(other, torch.rand(2, 4, dtype=torch.float64))
    c._buffers["u0"] = state["u0"]  # a stale u of another architecture
    with pytest.raises(ValueError, match="another architecture"):
        c(other, torch.rand(2, 4, dtype=torch.float64), y)


@pytest.mark.parametrize("name,params", [
    ("opnorm", {"form": "sos", "eps": 0.5}),
    ("opnorm", {"form": "uJv", "iterations": 3}),
    ("opnorm", {"norm": "linf", "eps": 0.05}),
    ("opnorm", {"warm_start": True, "eps": 0.5}),
    ("opnorm-at", {"eps": 0.5, "steps": 3}),
    ("snr", {}),
])
@pytest.mark.parametrize("training", [True, False])
def test_modes_restored_and_bn_stats_untouched(name: str, params: dict, training: bool) -> None:
    model = bn_net().train(training)
    model[5].train(not training)  # mixed modes: every submodule's own mode must come back
    modes = [m.training for m in model.modules()]
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 3, (8,))
    idx = torch.arange(8)
    pen = make(name, **params)
    pen.setup(model, x)
    ctx = CleanPass(model, x, y, index=idx)
    before = bn_state(model)
    value = pen(model, x, y, ctx=ctx)
    (value + ctx.losses()[0]).backward()
    assert float(value.detach()) > 0
    assert [m.training for m in model.modules()] == modes
    for k, v in bn_state(model).items():
        assert torch.equal(v, before[k]), k


def test_eps_zero_and_bad_arguments() -> None:
    model, x, y = relu_mlp(), torch.rand(4, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    assert float(make("opnorm", eps=0)(model, x, y)) == 0.0
    assert float(make("opnorm-at", eps=0)(model, x, y)) == 0.0
    with pytest.raises(ValueError, match="form"):
        make("opnorm", form="frobenius")


def test_cold_start_is_the_same_for_any_split_of_the_batch() -> None:
    """Without warm start the random v comes from the loop's BatchNoise: the two halves of a
    batch (two ranks) draw what the whole batch draws, so the per-sample penalties agree."""
    from gradreg.penalties.base import BatchNoise

    model = relu_mlp()
    x = torch.rand(8, 8, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)
    pen = make("opnorm", eps=0.1, iterations=1)  # one iteration: the start still matters

    def value(rows: torch.Tensor) -> float:
        noise = BatchNoise(7, rows, 8)
        ctx = CleanPass(model, x[rows], y[rows], index=rows, noise=noise)
        return float(pen(model, x[rows], y[rows], ctx=ctx))

    whole = value(torch.arange(8))
    halves = (value(torch.arange(0, 4)) + value(torch.arange(4, 8))) / 2
    assert halves == pytest.approx(whole, rel=1e-12)


def test_a_zero_output_space_start_restarts_at_random() -> None:
    """A kept u of zeros (from a step where the model ignored its input) must not stay a fixed
    point of the warm-start iteration."""
    model = relu_mlp()
    x = torch.rand(4, 8, dtype=torch.float64)
    u0 = torch.randn(4, 3, dtype=torch.float64)
    u0[1] = 0
    res = power_method(model, x, iterations=1, u0=u0)
    assert bool((res.v.flatten(1).norm(dim=1) > 0.99).all()) and bool((res.sigma > 0).all())
