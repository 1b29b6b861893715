"""GN and SGR (SPEC §3) against explicit matrices built here: Σ = I is GN, the covariance-
function representation equals the full matrix for a stationary Σ, the EMA / mean / data
standardization follow their formulas, perturbation sources and schedule, checkpoints."""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from gradreg.penalties.base import CleanPass
from gradreg.models.base import Classifier
from gradreg.penalties import make
from gradreg.penalties.sgr import GN, SGR, CovFunCovariance, FullCovariance, PerturbationSource, SigmaEstimator

SHAPE = (2, 5, 4)  # two channels, non-square: exercises the inter-channel function and both axes
D = math.prod(SHAPE)


def tiny_model(shape: tuple[int, int, int] = SHAPE, *, bn: bool = False, seed: int = 0) -> Classifier:
    """2-layer tanh MLP, float64 (tanh: the double backprop is not trivially zero)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(math.prod(shape), 6)]
    if bn:
        layers.append(nn.BatchNorm1d(6))
    layers.append(nn.Tanh())
    return Classifier(nn.Sequential(*layers), 6, in_shape=shape, num_classes=3).double()


def batch(n: int = 6, seed: int = 1, shape: tuple[int, int, int] = SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool = True) -> torch.Tensor:
    """(N, C, H, W): each sample's ∇ₓ of its own loss, one at a time."""
    out = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi, create_graph=create_graph)
        out.append(gi)
    return torch.cat(out)


def param_grads(value: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, list(model.parameters()))])


def index_pairs(shape: tuple[int, int, int] = SHAPE):
    """Every ordered pair of input coordinates with (same channel?, rounded pixel distance)."""
    c, h, w = shape
    coords = [(ch, py, px) for ch in range(c) for py in range(h) for px in range(w)]  # flatten order
    for a, (ca, ya, xa) in enumerate(coords):
        for b, (cb, yb, xb) in enumerate(coords):
            yield a, b, ca == cb, int(round(math.hypot(ya - yb, xa - xb)))


def explicit_stationary(intra, inter, shape=SHAPE, radius=None) -> torch.Tensor:
    """The d×d matrix with entries intra(r) within a channel and inter(r) across, r rounded."""
    d = math.prod(shape)
    sigma = torch.zeros(d, d, dtype=torch.float64)
    for a, b, same, r in index_pairs(shape):
        if radius is None or r <= radius:
            sigma[a, b] = intra(r) if same else inter(r)
    return sigma


def circulant_psd(intra, inter, shape=SHAPE, radius=None) -> torch.Tensor:
    """Σ as ``covfun`` applies it, computed densely: the stationary kernel on the 2H×2W torus
    (displacements |dy| < H, |dx| < W), its circulant matrix with the eigenvalues clamped at 0
    (numpy's eigh), restricted to the H×W pixels of every channel."""
    c, h, w = shape
    big_h, big_w = 2 * h, 2 * w
    n = big_h * big_w
    pos = [(py, px) for py in range(big_h) for px in range(big_w)]
    k = np.zeros((c * n, c * n))
    for a, (ya, xa) in enumerate(pos):
        for b, (yb, xb) in enumerate(pos):
            dy, dx = (ya - yb) % big_h, (xa - xb) % big_w
            dy, dx = (dy if dy < h else dy - big_h), (dx if dx < w else dx - big_w)
            if abs(dy) < h and abs(dx) < w:
                r = int(round(math.hypot(dy, dx)))
                if radius is None or r <= radius:
                    for ca in range(c):
                        for cb in range(c):
                            k[ca * n + a, cb * n + b] = intra(r) if ca == cb else inter(r)
    evals, evecs = np.linalg.eigh(k)
    k = (evecs * np.clip(evals, 0, None)) @ evecs.T
    keep = [ch * n + py * big_w + px for ch in range(c) for py in range(h) for px in range(w)]
    return torch.from_numpy(k[np.ix_(keep, keep)].copy())


def nearest_psd(m: torch.Tensor) -> torch.Tensor:
    evals, evecs = np.linalg.eigh(0.5 * (m.numpy() + m.numpy().T))
    return torch.from_numpy((evecs * np.clip(evals, 0, None)) @ evecs.T)


def explicit_pair_average(m: torch.Tensor, shape=SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Average of a d×d matrix's entries over index pairs at each rounded displacement."""
    rmax = int(round(math.hypot(shape[1] - 1, shape[2] - 1)))
    sums = torch.zeros(2, rmax + 1, dtype=torch.float64)
    counts = torch.zeros(2, rmax + 1, dtype=torch.float64)
    for a, b, same, r in index_pairs(shape):
        k = 0 if same else 1
        sums[k, r] += m[a, b]
        counts[k, r] += 1
    return sums[0] / counts[0], sums[1] / counts[1]


def second_moment(xi: torch.Tensor) -> torch.Tensor:
    flat = xi.flatten(1).double()
    return sum(torch.outer(v, v) for v in flat) / len(flat)


def fixed_sgr(tmp_path, name: str, tensors: dict, **kwargs) -> SGR:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    pen = SGR(sigma_file=str(path), standardize=kwargs.pop("standardize", "none"), **kwargs).double()
    pen.setup(None, batch()[0])
    return pen


def intra_fun(r: int) -> float:
    return math.exp(-r / 2.0)


def inter_fun(r: int) -> float:
    return 0.5 * math.exp(-r / 2.0)


# --------------------------------------------------------------------------- GN
def test_gn_is_half_squared_gradient_norm() -> None:
    model = tiny_model()
    x, y = batch()
    value = make("gn")(model, x, y)
    ref = 0.5 * per_sample_grads(model, x, y).pow(2).flatten(1).sum(dim=1).mean()
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(param_grads(value, model), param_grads(ref, model), rtol=1e-9, atol=1e-14)


def test_sgr_with_identity_equals_gn(tmp_path) -> None:
    model = tiny_model()
    x, y = batch()
    gn = make("gn")(model, x, y)
    gn_grads = param_grads(gn, model)
    gn = gn.detach()
    np.save(tmp_path / "eye.npy", np.eye(D))
    np.save(tmp_path / "delta.npy", np.array([1.0]))  # covariance function δ(r): Σ = I
    for rep, file in (("full", "eye.npy"), ("covfun", "eye.npy"), ("covfun", "delta.npy"), ("full", "delta.npy")):
        pen = SGR(representation=rep, sigma_file=str(tmp_path / file), standardize="none").double()
        value = pen(model, x, y)
        torch.testing.assert_close(value, gn, rtol=1e-10, atol=1e-14, msg=f"{rep} {file}")
        torch.testing.assert_close(param_grads(value, model), gn_grads, rtol=1e-9, atol=1e-14)
    # before its first update SGR's Σ is I: with unit standardization it is GN exactly
    fresh = SGR(representation="covfun", standardize="unit").double().eval()
    torch.testing.assert_close(fresh(model, x, y).detach(), gn, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name, kwargs", [("gn", {}), ("sgr", dict(representation="full", centred=False)),
                                          ("sgr", dict(representation="covfun", source="sign"))])
def test_model_ignoring_input_gives_zero_and_finite_grads(name: str, kwargs: dict) -> None:
    model = tiny_model()
    with torch.no_grad():
        model.features[1].weight.zero_()  # g = 0
    x, y = batch()
    pen = make(name, **kwargs).double()
    pen.setup(None, x)
    value = pen(model, x, y)
    assert float(value.detach()) == 0.0
    assert torch.isfinite(param_grads(value, model)).all()


# --------------------------------------------------------------------------- covfun = full
@pytest.mark.parametrize("radius", [None, 2])
def test_covfun_and_full_apply_their_psd_sigma(tmp_path, radius) -> None:
    """A stationary Σ from covariance functions (truncated at a radius or not), given as
    functions or as a matrix: covfun applies its PSD circulant embedding, full the nearest PSD
    matrix — both checked against dense eigendecompositions, and the penalty against einsum."""
    model = tiny_model()
    x, y = batch()
    sigma = explicit_stationary(intra_fun, inter_fun, radius=radius)
    rmax = int(round(math.hypot(SHAPE[1] - 1, SHAPE[2] - 1)))
    funs = {"cov_intra": torch.tensor([intra_fun(r) for r in range(rmax + 1)], dtype=torch.float64),
            "cov_inter": torch.tensor([inter_fun(r) for r in range(rmax + 1)], dtype=torch.float64)}
    full = fixed_sgr(tmp_path, "full", {"sigma": sigma}, representation="full")
    cf = fixed_sgr(tmp_path, "funs", funs, representation="covfun", radius_pixels=radius)
    assert isinstance(full.cov, FullCovariance) and isinstance(cf.cov, CovFunCovariance)
    g = torch.randn(7, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sigma_cf, sigma_full = circulant_psd(intra_fun, inter_fun, radius=radius), nearest_psd(sigma)
    torch.testing.assert_close(cf.matvec(g), (g.flatten(1) @ sigma_cf).view_as(g), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full.matvec(g), (g.flatten(1) @ sigma_full).view_as(g), rtol=1e-10, atol=1e-12)
    full_from_funs = fixed_sgr(tmp_path, "funs_full", funs, representation="full", radius_pixels=radius)
    torch.testing.assert_close(full_from_funs.matvec(g), (g.flatten(1) @ sigma_full).view_as(g),
                               rtol=1e-10, atol=1e-12)
    for pen, ref_sigma in ((full, sigma_full), (cf, sigma_cf)):
        gx = per_sample_grads(model, x, y).flatten(1)
        ref = 0.5 * torch.einsum("ni,ij,nj->n", gx, ref_sigma, gx).mean()
        value = pen(model, x, y)
        torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(param_grads(value, model), param_grads(ref, model), rtol=1e-9, atol=1e-13)
    if radius is None:  # the matrix itself given to covfun: its per-displacement average is the same function
        from_matrix = fixed_sgr(tmp_path, "mat", {"sigma": sigma}, representation="covfun")
        torch.testing.assert_close(from_matrix.matvec(g), (g.flatten(1) @ sigma_cf).view_as(g),
                                   rtol=1e-10, atol=1e-12)


def test_covfun_estimate_is_the_pixel_pair_average() -> None:
    xi = torch.randn(3, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    pen = SGR(representation="covfun", standardize="none").double()
    pen.setup(None, batch()[0])
    pen.update(xi)
    intra, inter = explicit_pair_average(second_moment(xi))
    torch.testing.assert_close(pen.cov.cov_intra, intra, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pen.cov.cov_inter, inter, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pen.mean, xi.mean(dim=0), rtol=1e-12, atol=1e-14)


def test_covfun_estimate_single_channel_square() -> None:
    shape = (1, 4, 4)
    xi = torch.randn(5, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    pen = SGR(representation="covfun", standardize="none").double()
    pen.setup(None, torch.zeros(2, *shape, dtype=torch.float64))
    pen.update(xi)
    intra, _ = explicit_pair_average(second_moment(xi), shape)
    torch.testing.assert_close(pen.cov.cov_intra, intra, rtol=1e-10, atol=1e-12)
    assert torch.all(pen.cov.cov_inter == 0)


# --------------------------------------------------------------------------- EMA, standardization, mean
@pytest.mark.parametrize("representation", ["full", "covfun"])
@pytest.mark.parametrize("standardize", ["data", "unit", "none"])
def test_ema_standardization_and_mean_match_direct_computation(representation: str, standardize: str) -> None:
    gen = torch.Generator().manual_seed(11)
    train_x = torch.rand(30, *SHAPE, dtype=torch.float64, generator=gen) * torch.linspace(0.2, 1.0, D).view(SHAPE)
    xis = [torch.randn(4, *SHAPE, dtype=torch.float64, generator=gen) + 0.3 * k for k in range(3)]
    pen = SGR(representation=representation, standardize=standardize, beta=0.1, centred=False).double()
    pen.setup(None, train_x)
    for xi in xis:
        pen.update(xi)
    # explicit EMA: the first update replaces Σ = I, then Σ ← 0.9·Σ + 0.1·M
    ms = [second_moment(xi) for xi in xis]
    sigma = ms[0]
    mu = xis[0].mean(dim=0)
    for m, xi in zip(ms[1:], xis[1:]):
        sigma = 0.9 * sigma + 0.1 * m
        mu = 0.9 * mu + 0.1 * xi.mean(dim=0)
    if representation == "covfun":  # the estimator sees each batch through its pixel-pair average
        funs = [explicit_pair_average(m) for m in ms]
        intra, inter = funs[0]
        for fi, fe in funs[1:]:
            intra, inter = 0.9 * intra + 0.1 * fi, 0.9 * inter + 0.1 * fe
        sigma = circulant_psd(lambda r: float(intra[r]), lambda r: float(inter[r]))
    target = {"data": float(np.cov(train_x.reshape(30, -1).numpy().T).diagonal().mean()),
              "unit": 1.0, "none": float(sigma.diagonal().mean())}[standardize]
    s = target / float(sigma.diagonal().mean())
    g = torch.randn(5, *SHAPE, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(pen.matvec(g), s * (g.flatten(1) @ sigma).view_as(g), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pen.mean, mu, rtol=1e-12, atol=1e-14)
    # the penalty: ½·mean gᵀ(sΣ)g + mean gᵀ(√s·μ) (uncentred) and the centred part alone
    model = tiny_model()
    x, y = batch()
    pen.eval()
    gx = per_sample_grads(model, x, y).flatten(1)
    quad = 0.5 * s * torch.einsum("ni,ij,nj->n", gx, sigma, gx).mean()
    lin = math.sqrt(s) * (gx @ mu.flatten()).mean()
    torch.testing.assert_close(pen(model, x, y), quad + lin, rtol=1e-10, atol=1e-14)
    pen.estimator = dataclasses.replace(pen.estimator, centred=True)
    torch.testing.assert_close(pen(model, x, y), quad, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- sources and schedule
def test_grad_source_updates_on_schedule() -> None:
    model = tiny_model()
    pen = SGR(representation="full", source="grad", eps=0.2, update_every=3, standardize="none").double()
    pen.setup(None, batch()[0])
    x, y = batch(seed=2)
    value = pen(model, x, y)
    g = per_sample_grads(model, x, y)
    xi = 0.2 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    sigma = second_moment(xi)
    torch.testing.assert_close(pen.cov.sigma, sigma, rtol=1e-10, atol=1e-14)
    gx = g.flatten(1)
    torch.testing.assert_close(value, 0.5 * torch.einsum("ni,ij,nj->n", gx, sigma, gx).mean(), rtol=1e-10, atol=1e-16)
    snapshots = [pen.cov.sigma.clone()]
    for seed in (3, 4, 5):  # steps 1, 2 keep Σ; step 3 updates it
        pen(model, *batch(seed=seed))
        snapshots.append(pen.cov.sigma.clone())
    assert torch.equal(snapshots[0], snapshots[1]) and torch.equal(snapshots[1], snapshots[2])
    assert not torch.equal(snapshots[2], snapshots[3])
    assert int(pen.num_updates) == 2 and int(pen.step) == 4
    pen.eval()  # frozen: no update, no step
    pen(model, *batch(seed=9))
    assert torch.equal(pen.cov.sigma, snapshots[3]) and int(pen.step) == 4


def test_sign_source() -> None:
    model = tiny_model()
    pen = SGR(representation="covfun", source="sign", eps=0.05, standardize="none").double()
    pen.setup(None, batch()[0])
    x, y = batch(seed=2)
    pen(model, x, y)
    xi = 0.05 * per_sample_grads(model, x, y).sign()
    intra, inter = explicit_pair_average(second_moment(xi))
    torch.testing.assert_close(pen.cov.cov_intra, intra, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pen.cov.cov_inter, inter, rtol=1e-10, atol=1e-12)


def test_fgsm_source_runs_in_eval_mode_and_restores_the_model() -> None:
    model = tiny_model(bn=True).train()
    reference = copy.deepcopy(model)
    x, y = batch(n=8, seed=2)
    pen = SGR(representation="full", source="fgsm", eps=0.1, bounds=(0.0, 1.0), standardize="none").double()
    pen.setup(None, batch()[0])
    ctx = CleanPass(model, x, y, need_input_grad=True)  # the training loop's clean pass (train mode)
    pen(model, x, y, ctx=ctx)
    # reference: the clean pass in train mode, then FGSM on the eval-mode model, clipped to bounds
    reference(x)
    reference.eval()
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(reference(xr), y, reduction="sum"), xr)
    xi = (x + 0.1 * g.sign()).clamp(0.0, 1.0) - x
    torch.testing.assert_close(pen.cov.sigma, second_moment(xi), rtol=1e-10, atol=1e-14)
    assert model.training and all(m.training for m in model.modules())
    bn, bn_ref = model.features[2], reference.features[2]
    assert torch.equal(bn.running_mean, bn_ref.running_mean) and torch.equal(bn.running_var, bn_ref.running_var)


def test_fgsm_source_with_predicted_labels_follows_the_prediction() -> None:
    """labels="predicted": ξ is the FGSM step on the eval-mode model's argmax, not on y; on rows
    where the prediction differs from y it differs from the true-label step."""
    model = tiny_model(bn=True).train()
    reference = copy.deepcopy(model)
    x, _ = batch(n=12, seed=2)
    reference(x)  # the loop's clean pass (train mode) moves BatchNorm's statistics first
    reference.eval()
    pred = reference(x).argmax(dim=1)
    y = torch.where(torch.arange(len(x)) % 2 == 0, pred, (pred + 1) % 3)  # wrong on every odd row
    pen = SGR(representation="full", source="fgsm", eps=0.1, bounds=(0.0, 1.0), standardize="none",
              labels="predicted").double()
    pen.setup(None, batch()[0])
    pen(model, x, y, ctx=CleanPass(model, x, y, need_input_grad=True))

    def xi(target: torch.Tensor) -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(reference(xr), target, reduction="sum"), xr)
        return (x + 0.1 * g.sign()).clamp(0.0, 1.0) - x

    torch.testing.assert_close(pen.cov.sigma, second_moment(xi(pred)), rtol=1e-10, atol=1e-14)
    differs = (xi(pred) != xi(y)).flatten(1).any(dim=1)
    assert torch.equal(differs, pred != y) and bool(differs.any())
    with pytest.raises(ValueError, match="labels"):
        SGR(labels="leaky")


def test_pgd_source_stays_in_the_threat_model() -> None:
    model = tiny_model()
    x, y = batch(seed=2)
    pen = SGR(representation="full", source="pgd", eps=0.05, pgd_steps=3, standardize="none").double()
    pen.setup(None, batch()[0])
    torch.manual_seed(0)
    pen(model, x, y)
    # Σ's diagonal is the mean of ξ²: every |ξ| ≤ ε, so no diagonal entry exceeds ε²
    assert int(pen.num_updates) == 1
    assert float(pen.cov.sigma.diagonal().max()) <= 0.05 ** 2 + 1e-12
    assert float(pen.cov.sigma.diagonal().mean()) > 0


def test_auto_representation_and_defaults() -> None:
    small = make("sgr")
    small.setup(None, torch.rand(3, 1, 28, 28))
    assert isinstance(small.cov, FullCovariance)
    big = make("sgr")
    big.setup(None, torch.rand(3, 3, 32, 32))
    assert isinstance(big.cov, CovFunCovariance)
    assert big.cov.cov_intra.shape == (round(math.hypot(31, 31)) + 1,)
    assert make("sgr").update_every == 10 and make("sgr", source="sign").update_every == 1
    assert GN.default_lam > 0 and SGR.default_lam > 0
    with pytest.raises(ValueError):
        make("sgr", representation="dense")
    with pytest.raises(ValueError):
        make("sgr", source="noise")


def test_specs_and_flat_parameters_build_the_same_penalty() -> None:
    """``--set penalty.NAME=`` gives flat parameters; they fill the two specs, and the penalty
    built from either computes the same Σ update and value."""
    flat = SGR(representation="full", source="pgd", eps=0.05, pgd_steps=3, standardize="none").double()
    spec = SGR(estimator=SigmaEstimator(representation="full", standardize="none"),
               perturbations=PerturbationSource(kind="pgd", eps=0.05, pgd_steps=3)).double()
    assert flat.estimator == spec.estimator and flat.perturbations == spec.perturbations
    assert flat.update_every == 10 and flat.source == "pgd" and flat.eps == 0.05
    model, (x, y) = tiny_model().double(), batch()
    values = []
    for pen in (flat, spec):
        torch.manual_seed(0)  # the PGD source's random start
        values.append(pen(model, x.double(), y))
        values.append(pen(model, x.double(), y))  # after the first Σ update
    torch.testing.assert_close(values[0], values[2], rtol=0, atol=0)
    torch.testing.assert_close(values[1], values[3], rtol=0, atol=0)
    with pytest.raises(TypeError, match="unexpected parameter"):
        make("sgr", epsilon=0.1)
    with pytest.raises(TypeError, match="not both"):
        SGR(estimator=SigmaEstimator(), eps=0.1)


# --------------------------------------------------------------------------- state and files
@pytest.mark.parametrize("representation", ["full", "covfun"])
def test_state_dict_round_trip_restores_sigma_exactly(representation: str) -> None:
    model = tiny_model().float()
    pen = SGR(representation=representation, source="grad", centred=False)
    pen.setup(None, batch()[0].float())
    for seed in range(3):
        x, y = batch(seed=seed)
        pen(model, x.float(), y)
    state = pen.state_dict()
    resumed = SGR(representation=representation, source="grad", centred=False)
    resumed.setup(None, batch()[0].float())
    resumed.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert int(resumed.num_updates) == 3 and int(resumed.step) == 3
    pen.eval(), resumed.eval()
    x, y = batch(seed=10)
    assert torch.equal(resumed(model, x.float(), y), pen(model, x.float(), y))


def test_sigma_file_never_unpickles(tmp_path) -> None:
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        SGR(sigma_file=str(path))
    with pytest.raises(ValueError):
        SGR(sigma_file=str(tmp_path / "sigma.pt"))


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("representation", ["full", "covfun"])
def test_gradcheck(representation: str) -> None:
    model = tiny_model()
    pen = SGR(representation=representation, source="grad", standardize="unit", centred=False).double()
    pen.setup(None, batch()[0])
    pen(model, *batch(seed=4))  # one update: a non-trivial Σ and μ
    pen.eval()
    x, y = batch(n=3)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def fn(*ps: torch.Tensor) -> torch.Tensor:
        class Wrapped(nn.Module):
            def forward(self, inp: torch.Tensor) -> torch.Tensor:
                return functional_call(model, dict(zip(names, ps)), (inp,))

        return pen(Wrapped(), x, y)

    assert torch.autograd.gradcheck(fn, params, fast_mode=True)
    if representation == "covfun":  # double backward through the FFTs
        assert torch.autograd.gradgradcheck(fn, params, fast_mode=True)


# --------------------------------------------------------------------------- data parallelism
def _rank_worker(rank: int, world: int, port: int, queue) -> None:  # runs in a spawned process
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        xi = torch.randn(7, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        shard = xi[:4] if rank == 0 else xi[4:]  # unequal shards of one global batch
        result = {}
        for rep in ("full", "covfun"):
            pen = SGR(representation=rep, standardize="none").double()
            pen.setup(None, batch()[0])
            pen.update(shard)
            result[rep] = {k: v.numpy().copy() for k, v in pen.state_dict().items()}  # plain pickles
        queue.put((rank, result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_update_averages_the_global_batch_over_ranks() -> None:
    """Two gloo ranks with unequal shards end with the Σ and μ of the whole batch."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    xi = torch.randn(7, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    m = second_moment(xi)
    intra, inter = explicit_pair_average(m)
    for rank in (0, 1):
        full = {k: torch.from_numpy(v) for k, v in results[rank]["full"].items()}
        cf = {k: torch.from_numpy(v) for k, v in results[rank]["covfun"].items()}
        torch.testing.assert_close(full["cov.sigma"], m, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(cf["cov.cov_intra"], intra, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(cf["cov.cov_inter"], inter, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(full["mean"], xi.mean(dim=0), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- Σ is PSD
def correlated_noise(m: int, shape: tuple[int, int, int], length: float, gen: torch.Generator) -> torch.Tensor:
    """White noise smoothed by a Gaussian of ``length`` pixels (0: white), channels mixed."""
    c, h, w = shape
    z = torch.randn(m, c, h, w, dtype=torch.float64, generator=gen)
    if length > 0:
        r = torch.arange(-3, 4, dtype=torch.float64)
        k1 = torch.exp(-0.5 * (r / length) ** 2)
        kernel = (k1[:, None] * k1[None, :] / k1.sum() ** 2).expand(c, 1, 7, 7)
        z = F.conv2d(F.pad(z, (3, 3, 3, 3), mode="circular"), kernel, groups=c)
    mix = torch.eye(c, dtype=torch.float64) + 0.5 * torch.rand(c, c, dtype=torch.float64, generator=gen)
    return torch.einsum("dc,mchw->mdhw", mix, z)


def applied_matrix(pen: SGR, shape: tuple[int, int, int]) -> torch.Tensor:
    """The d×d matrix that pen.matvec applies, column by column."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=torch.float64).view(d, *shape)
    return pen.matvec(basis).reshape(d, d)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), c=st.integers(1, 3), h=st.integers(3, 7), w=st.integers(3, 7),
       m=st.integers(1, 6), length=st.sampled_from([0.0, 0.7, 1.5, 3.0]), signs=st.booleans(),
       radius=st.sampled_from([None, 1, 2]), representation=st.sampled_from(["full", "covfun"]))
def test_sigma_is_psd_and_the_penalty_nonnegative(seed: int, c: int, h: int, w: int, m: int, length: float,
                                                  signs: bool, radius: int | None, representation: str) -> None:
    """For random and spatially correlated perturbations (and their signs, as FGSM gives), after
    one or two EMA updates: Σ's eigenvalues ≥ −1e-6·λ_max and gᵀΣg ≥ 0, every representation."""
    shape = (c, h, w)
    gen = torch.Generator().manual_seed(seed)
    pen = SGR(representation=representation, standardize="unit", radius_pixels=radius).double()
    pen.setup(None, torch.rand(2, *shape, dtype=torch.float64, generator=gen))
    for _ in range(2):
        xi = correlated_noise(m, shape, length, gen)
        pen.update(0.1 * xi.sign() if signs else xi)
    evals = torch.linalg.eigvalsh(applied_matrix(pen, shape))
    assert evals.min() >= -1e-6 * evals.abs().max()
    g = torch.randn(16, *shape, dtype=torch.float64, generator=gen)
    assert (pen.cov.quadratic(g) >= -1e-9 * g.flatten(1).pow(2).sum(dim=1) * evals.abs().max()).all()
    assert pen.omega(g) >= 0
    assert float(GN().omega(g)) >= 0  # Σ = I


def test_the_raw_covariance_function_is_not_psd_but_the_sigma_used_is() -> None:
    """The failure the PSD construction repairs: spatially correlated perturbations give a
    per-displacement average whose stationary matrix has negative eigenvalues."""
    shape = (1, 12, 12)
    pen = SGR(representation="covfun", standardize="none").double()
    pen.setup(None, torch.zeros(2, *shape, dtype=torch.float64))
    pen.update(correlated_noise(4, shape, 1.5, torch.Generator().manual_seed(3)))
    intra = pen.cov.cov_intra
    raw = explicit_stationary(lambda r: float(intra[r]), lambda r: 0.0, shape=shape)
    assert torch.linalg.eigvalsh(raw).min() < -1e-3 * torch.linalg.eigvalsh(raw).max()
    used = torch.linalg.eigvalsh(applied_matrix(pen, shape))
    assert used.min() >= -1e-9 * used.max()
