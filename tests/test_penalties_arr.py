"""ARR and TRADES: values and gradients against an independent computation, gradcheck in
float64, ε = 0, TRADES' KL-maximizing inner attack, and mode / BatchNorm hygiene."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradreg.objective import Objective
from gradreg.penalties import CleanPass, make
from gradreg.threat import ThreatModel


class TanhNet(nn.Module):
    """f(x) = tanh(x W₁) W₂ with the weights as plain tensors, so gradcheck can vary them."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor) -> None:
        super().__init__()
        self.w1, self.w2 = w1, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ self.w1) @ self.w2


def weights(d: int = 6, h: int = 5, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d, h, generator=gen, dtype=torch.float64)
    w2 = torch.randn(h, k, generator=gen, dtype=torch.float64)
    return w1.requires_grad_(True), w2.requires_grad_(True)


def interior_batch(n: int = 5, d: int = 6, k: int = 3, seed: int = 1):
    """Inputs in [0.2, 0.8], so small attacks never touch the [0, 1] bounds."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(n, d, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, k, (n,), generator=gen)


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def reference_divergence(name: str, clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    if name == "kl":  # KL(p(x) ‖ p(x_adv)), batchmean, as TRADES writes it
        return F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
    if name == "l2-logits":
        return ((clean - adv) ** 2).sum() / len(clean)
    return ((F.softmax(clean, 1) - F.softmax(adv, 1)) ** 2).sum() / len(clean)


@pytest.mark.parametrize("div", ["kl", "l2-logits", "l2-probs"])
def test_arr_fgsm_matches_independent_computation(div: str) -> None:
    w1, w2 = weights()
    model = TanhNet(w1, w2)
    x, y = interior_batch()
    eps = 0.05
    pen = make("arr", divergence=div, attack="fgsm", eps=eps)
    value = pen(model, x, y)
    got = torch.autograd.grad(value, (w1, w2))

    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    x_adv = (x + eps * g.sign()).clamp(0, 1)  # detached: a constant for the θ-gradient
    ref = reference_divergence(div, model(x), model(x_adv))
    want = torch.autograd.grad(ref, (w1, w2))  # gradient through both branches
    torch.testing.assert_close(value, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert float(value.detach()) > 0


@pytest.mark.parametrize("name,params", [
    ("arr", {"divergence": "kl"}),
    ("arr", {"divergence": "l2-probs", "attack": "pgd", "steps": 2}),
    ("trades", {"steps": 3}),
])
def test_gradcheck_float64(name: str, params: dict) -> None:
    """x_adv is detached and, for ℓ∞ sign steps, locally constant in θ: the penalty is then a smooth
    function of θ whose autograd gradient finite differences must reproduce."""
    w1, w2 = weights(d=4, h=3, k=3)
    x, y = interior_batch(n=3, d=4)
    pen = make(name, eps=0.03, **params)

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # TRADES' start noise
        return pen(TanhNet(a, b), x, y)

    assert torch.autograd.gradcheck(fn, (w1, w2))
    if name == "arr" and params["divergence"] == "kl":
        assert torch.autograd.gradgradcheck(fn, (w1, w2))


@pytest.mark.parametrize("name", ["arr", "trades"])
def test_eps_zero_adds_exactly_zero(name: str) -> None:
    model = bn_net().train()
    x = torch.rand(8, 1, 6, 6)
    y = torch.randint(0, 3, (8,))
    pen = make(name, eps=0)
    assert torch.equal(pen.attack(model, x, y), x)  # the attack itself does not move at ε = 0
    objective = Objective([(name, pen, 6.0)])
    clean = Objective([])
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    out = objective(model, x, y)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    model.load_state_dict(model_state)  # the clean pass moved the running statistics; start again
    ref = clean(model, x, y)
    ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()))
    assert float(out.parts[name]) == 0.0
    assert torch.equal(out.loss, ref.loss)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


def test_trades_inner_attack_increases_kl() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.rand(32, 1, 6, 6)
    y = torch.randint(0, 5, (32,))
    eps = 0.1
    pen = make("trades", eps=eps)
    assert pen.default_lam == 6.0
    assert pen.rel_stepsize == pytest.approx(0.007 / 0.031)
    torch.manual_seed(1)
    x_adv = pen.attack(model, x, y)
    threat = ThreatModel(norm="linf", eps=eps, bounds=pen.bounds)
    assert bool(threat.contains(x, x_adv).all())

    def kl(x2: torch.Tensor) -> torch.Tensor:  # per sample KL(p(x) ‖ p(x2))
        with torch.no_grad():
            log_p, log_q = F.log_softmax(model(x), 1), F.log_softmax(model(x2), 1)
        return (log_p.exp() * (log_p - log_q)).sum(1)

    gen = torch.Generator().manual_seed(2)
    start = threat.project(x, x + 0.001 * torch.randn(x.shape, generator=gen))
    random_points = threat.random_start(x, gen)
    assert bool((kl(x_adv) > kl(start)).all())
    assert bool((kl(x_adv) > kl(random_points)).all())
    assert float(kl(x_adv).mean()) > 10 * float(kl(random_points).mean())
    # the KL objective never reads the labels (a CE attack would)
    torch.manual_seed(1)
    assert torch.equal(pen.attack(model, x, (y + 1) % 5), x_adv)


def test_arr_pgd_inner_attack_within_threat_and_ascends() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x, y = torch.rand(16, 1, 6, 6), torch.randint(0, 5, (16,))
    for norm, eps in (("linf", 0.05), ("l2", 0.5)):
        pen = make("arr", attack="pgd", steps=3, norm=norm, eps=eps)
        x_adv = pen.attack(model, x, y)
        assert bool(ThreatModel(norm=norm, eps=eps, bounds=pen.bounds).contains(x, x_adv).all())
        with torch.no_grad():
            assert bool((F.cross_entropy(model(x_adv), y, reduction="none")
                         > F.cross_entropy(model(x), y, reduction="none")).all())


@pytest.mark.parametrize("name,params", [
    ("arr", {"divergence": "kl"}),
    ("arr", {"divergence": "l2-logits", "attack": "pgd", "steps": 2}),
    ("trades", {"steps": 2}),
])
@pytest.mark.parametrize("training", [True, False])
def test_modes_restored_and_bn_stats_untouched(name: str, params: dict, training: bool) -> None:
    model = bn_net().train(training)
    model[5].train(not training)
    modes = [m.training for m in model.modules()]
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 3, (8,))
    ctx = CleanPass(model, x, y)
    before = bn_state(model)
    value = make(name, eps=0.1, **params)(model, x, y, ctx=ctx)
    (value + ctx.losses()[0]).backward()
    assert float(value.detach()) > 0
    assert [m.training for m in model.modules()] == modes
    for k, v in bn_state(model).items():
        assert torch.equal(v, before[k]), k
    # standalone (no shared clean pass): no statistics move either
    make(name, eps=0.1, **params)(model, x, y).backward()
    for k, v in bn_state(model).items():
        assert torch.equal(v, before[k]), k


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fgsm"):
        make("arr", attack="fgsm", steps=3)
    with pytest.raises(ValueError, match="divergence"):
        make("arr", divergence="js")
