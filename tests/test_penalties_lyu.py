"""Lyu's dual-norm family (SPEC §2): the maximizer r* against its closed form, the exact
penalty against a per-sample reference and gradcheck, the one-step solver against the
first-order expansion, and λ = 1 training exactly on L(x + r*)."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from gradreg.models.base import Classifier
from gradreg.objective import Objective
from gradreg.penalties import PENALTIES, make
from gradreg.penalties.lyu import Lyu
from gradreg.threat import steepest_direction

IN_SHAPE = (1, 4, 4)
NORMS = ["linf", "l2", "l1"]
DUAL_P = {"linf": 1.0, "l2": 2.0, "l1": float("inf")}


def tiny_model(seed: int = 0, *, bn: bool = False) -> Classifier:
    """2-layer softplus MLP on 1×4×4 inputs, float64."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(16, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Softplus()]
    features = nn.Sequential(*layers)
    return Classifier(features, 6, in_shape=IN_SHAPE, num_classes=3).double()


def batch(n: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *IN_SHAPE, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool = False) -> list:
    grads = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi, create_graph=create_graph)
        grads.append(gi)
    return grads


def closed_form(g: torch.Tensor, sigma: float, q: float) -> torch.Tensor:
    """σ·sign(g)⊙|g|^{q−1} / ‖g‖_q^{q−1} for a finite dual exponent q (one flat vector)."""
    return sigma * g.sign() * g.abs() ** (q - 1) / torch.linalg.vector_norm(g, ord=q) ** (q - 1)


def param_grads(value: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, list(model.parameters()))])


def test_maximizer_matches_closed_form() -> None:
    g = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sigma = 0.3
    for norm, q in (("linf", 1.0), ("l2", 2.0)):
        r = sigma * steepest_direction(g, norm)
        expected = torch.stack([closed_form(gi.flatten(), sigma, q).view_as(gi) for gi in g])
        torch.testing.assert_close(r, expected, rtol=1e-12, atol=1e-12)
    # p = 1: every bit of σ on argmax|gᵢ| — the q → ∞ limit of the closed form (made unique
    # by a clear margin so that the finite-q limit converges)
    flat = g.flatten(1)
    top = flat.abs().argmax(dim=1)
    flat[torch.arange(len(flat)), top] *= 1.5
    r = sigma * steepest_direction(g, "l1")
    onehot = torch.zeros_like(flat)
    idx = flat.abs().argmax(dim=1)
    onehot[torch.arange(len(flat)), idx] = sigma * flat[torch.arange(len(flat)), idx].sign()
    torch.testing.assert_close(r.flatten(1), onehot, rtol=0, atol=0)
    limit = torch.stack([closed_form(gi, sigma, 400.0) for gi in flat])
    torch.testing.assert_close(limit, onehot, rtol=0, atol=1e-2)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(NORMS), st.floats(0.01, 3.0), st.integers(0, 10_000))
def test_maximizer_attains_hoelder_bound(norm: str, sigma: float, seed: int) -> None:
    """‖r*‖_p = σ and ⟨g, r*⟩ = σ‖g‖_{p*}: r* is feasible and reaches the dual-norm bound."""
    g = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    r = sigma * steepest_direction(g, norm)
    p = {"linf": float("inf"), "l2": 2.0, "l1": 1.0}[norm]
    torch.testing.assert_close(torch.linalg.vector_norm(r.flatten(1), ord=p, dim=1),
                               torch.full((3,), sigma, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((g * r).flatten(1).sum(dim=1),
                               sigma * torch.linalg.vector_norm(g.flatten(1), ord=DUAL_P[norm], dim=1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
def test_exact_matches_per_sample_reference(norm: str) -> None:
    model = tiny_model()
    x, y = batch()
    sigma = 0.7
    value = make("lyu", norm=norm, sigma=sigma)(model, x, y)
    grads = per_sample_grads(model, x, y, create_graph=True)
    ref = sigma * torch.stack([torch.linalg.vector_norm(gi.flatten(), ord=DUAL_P[norm]) for gi in grads]).mean()
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(param_grads(value, model), param_grads(ref, model), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
def test_exact_gradcheck(norm: str) -> None:
    model = tiny_model()
    x, y = batch(n=3)
    pen = Lyu(norm=norm, sigma=0.5)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def fn(*ps: torch.Tensor) -> torch.Tensor:
        class Wrapped(nn.Module):
            def forward(self, inp: torch.Tensor) -> torch.Tensor:
                return functional_call(model, dict(zip(names, ps)), (inp,))

        return pen(Wrapped(), x, y)

    assert torch.autograd.gradcheck(fn, params, fast_mode=True)
    if norm == "l2":
        assert torch.autograd.gradgradcheck(fn, params, fast_mode=True)


@pytest.mark.parametrize("norm", NORMS)
def test_onestep_is_first_order_expansion(norm: str) -> None:
    model = tiny_model()
    x, y = batch()
    dual = torch.stack([torch.linalg.vector_norm(gi.flatten(), ord=DUAL_P[norm])
                        for gi in per_sample_grads(model, x, y)]).mean()
    errors = []
    for sigma in (1e-1, 1e-2, 1e-3):
        value = Lyu(norm=norm, sigma=sigma, solver="onestep")(model, x, y).detach()
        errors.append(float(abs(value - sigma * dual)) / sigma)  # relative to the O(σ) term: O(σ)
    assert all(b < a / 5 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 * float(dual), errors


@pytest.mark.parametrize("norm", NORMS)
def test_onestep_with_unit_lambda_trains_on_the_adversarial_example(norm: str) -> None:
    model = tiny_model()
    x, y = batch()
    sigma = 0.4
    out = Objective([("lyu", Lyu(norm=norm, sigma=sigma, solver="onestep"), 1.0)])(model, x, y)
    g = torch.cat(per_sample_grads(model, x, y))
    if norm == "l1":
        flat = g.flatten(1)
        r = torch.zeros_like(flat)
        idx = flat.abs().argmax(dim=1)
        r[torch.arange(len(flat)), idx] = sigma * flat[torch.arange(len(flat)), idx].sign()
        r = r.view_as(g)
    else:
        r = torch.stack([closed_form(gi.flatten(), sigma, DUAL_P[norm]).view_as(gi) for gi in g])
    adv = F.cross_entropy(model(x + r), y)
    torch.testing.assert_close(out.loss, adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(param_grads(out.loss, model), param_grads(adv, model), rtol=1e-10, atol=1e-12)


def test_onestep_with_batchnorm_in_train_mode() -> None:
    """The perturbed pass uses train-mode batch statistics like the clean pass, leaves the
    running statistics to the clean pass alone, and keeps the graph differentiable."""
    model = tiny_model(bn=True).train()
    reference = copy.deepcopy(model)
    x, y = batch(n=8)
    sigma = 0.2
    out = Objective([("lyu", Lyu(norm="l2", sigma=sigma, solver="onestep"), 1.0)])(model, x, y)
    grads = param_grads(out.loss, model)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(reference(xr), y, reduction="sum"), xr)  # train mode: updates stats once
    r = sigma * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    frozen = copy.deepcopy(reference)
    adv = F.cross_entropy(frozen(x + r), y)  # train mode, batch statistics of x + r
    torch.testing.assert_close(out.loss, adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads, param_grads(adv, frozen), rtol=1e-10, atol=1e-12)
    bn, bn_ref = model.features[2], reference.features[2]
    assert model.training and bn.track_running_stats
    assert torch.equal(bn.running_mean, bn_ref.running_mean) and torch.equal(bn.running_var, bn_ref.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_onestep_bounds_clip_the_adversarial_example() -> None:
    model = tiny_model()
    x, y = batch()
    sigma = 0.5
    value = Lyu(norm="linf", sigma=sigma, solver="onestep", bounds=(0.0, 1.0))(model, x, y)
    g = torch.cat(per_sample_grads(model, x, y))
    x_adv = (x + sigma * g.sign()).clamp(0, 1)
    expected = F.cross_entropy(model(x_adv), y) - F.cross_entropy(model(x), y)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


def test_defaults() -> None:
    pen = make("lyu")
    assert isinstance(pen, Lyu) and pen.solver == "exact" and pen.norm == "linf"
    assert PENALTIES.get("lyu")().default_lam == 1.0
    with pytest.raises(ValueError):
        make("lyu", solver="twostep")
    with pytest.raises(ValueError):
        make("lyu", norm="l3")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("solver", ["exact", "onestep"])
def test_model_ignoring_input_gives_zero_and_finite_grads(norm: str, solver: str) -> None:
    model = tiny_model()
    with torch.no_grad():
        model.features[1].weight.zero_()  # g = 0: r* = 0 and every dual norm is 0
    x, y = batch()
    value = Lyu(norm=norm, sigma=0.5, solver=solver)(model, x, y)
    assert float(value.detach()) == 0.0
    assert torch.isfinite(param_grads(value, model)).all()
