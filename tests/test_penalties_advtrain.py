"""FGSM-AT and PGD-AT: the objective against an independent Goodfellow mix, the threat-model
invariants of PGD-AT's examples, and mode / BatchNorm hygiene."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradreg import models
from gradreg.objective import Objective
from gradreg.penalties import CleanPass, make
from gradreg.threat import ThreatModel


def bn_net() -> nn.Module:
    """A tiny conv net with BatchNorm (2d and 1d) on (N, 1, 6, 6) inputs, 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def batch(n: int = 8, shape: tuple[int, ...] = (1, 6, 6), classes: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=gen), torch.randint(0, classes, (n,), generator=gen)


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_fgsm_at_objective_is_goodfellow_mix_multi_head() -> None:
    torch.manual_seed(0)
    model = models.make("mlp", in_shape=(1, 4, 4), num_classes=5, hidden=(12,), aux_classes=(2,)).double()
    x = torch.rand(10, 1, 4, 4, dtype=torch.float64) * 0.8 + 0.1
    y = torch.stack([torch.randint(0, 5, (10,)), torch.randint(0, 2, (10,))], dim=1)
    eps = 0.05
    pen = make("fgsm-at", eps=eps)
    assert (pen.task_weight, pen.default_lam, pen.adv_weight) == (0.0, 1.0, 0.5)
    loss = Objective([("fgsm-at", pen, pen.default_lam)], task_weight=pen.task_weight)(model, x, y).loss
    got = torch.autograd.grad(loss, list(model.parameters()))

    # independent: g of the main head's loss, x_adv = clip(x + ε sign g), α L(x) + (1−α) L(x_adv)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y[:, 0]), xg)
    x_adv = (x + eps * g.sign()).clamp(0, 1)

    def task(inp: torch.Tensor) -> torch.Tensor:
        main, aux = model(inp, all_heads=True)
        return F.cross_entropy(main, y[:, 0]) + F.cross_entropy(aux, y[:, 1])

    ref = 0.5 * task(x) + 0.5 * task(x_adv)
    want = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_pgd_at_examples_within_threat_and_harder(norm: str, eps: float) -> None:
    model = bn_net().eval()
    x, y = batch(16)
    pen = make("pgd-at", eps=eps, norm=norm, steps=5)
    assert (pen.task_weight, pen.default_lam) == (0.0, 1.0)
    x_adv = pen.attack(model, x, y)
    threat = ThreatModel(norm=norm, eps=eps, bounds=pen.bounds)
    assert not x_adv.requires_grad
    assert bool(threat.contains(x, x_adv).all())
    assert float(threat.distance(x, x_adv).max()) <= eps * (1 + 1e-5)
    assert float(threat.distance(x, x_adv).min()) > 0.5 * eps  # it moved
    clean = F.cross_entropy(model(x), y, reduction="none")
    adv = F.cross_entropy(model(x_adv), y, reduction="none")
    assert bool((adv > clean).all())
    # the value is the loss on the (seeded) PGD examples
    torch.manual_seed(3)
    value = pen(model, x, y)
    torch.manual_seed(3)
    torch.testing.assert_close(value, F.cross_entropy(model(pen.attack(model, x, y)), y))


@pytest.mark.parametrize("name", ["fgsm-at", "pgd-at"])
@pytest.mark.parametrize("training", [True, False])
def test_modes_restored_and_bn_stats_untouched(name: str, training: bool) -> None:
    model = bn_net().train(training)
    model[5].train(not training)  # a mixed-mode model: every submodule's own mode must come back
    modes = [m.training for m in model.modules()]
    x, y = batch(8)
    ctx = CleanPass(model, x, y)  # the loop's clean pass (it may update BN statistics)
    before = bn_state(model)
    value = make(name, eps=0.1, norm="linf")(model, x, y, ctx=ctx)
    (value + ctx.losses()[0]).backward()  # no in-place conflicts with the restored statistics
    assert [m.training for m in model.modules()] == modes
    for k, v in bn_state(model).items():
        assert torch.equal(v, before[k]), k


def test_perturbed_bn_policy_train_updates_stats() -> None:
    model = bn_net().train()
    x, y = batch(8)
    before = bn_state(model)
    make("pgd-at", eps=0.1, steps=2, perturbed_bn_policy="train")(model, x, y)
    assert not torch.equal(bn_state(model)["1.running_mean"], before["1.running_mean"])
    assert model.training


def test_bad_policy_rejected() -> None:
    with pytest.raises(ValueError, match="BatchNorm policy"):
        make("pgd-at", bn_policy="batch")


def _linear_model() -> nn.Module:
    """A float64 linear classifier on (1, 4, 4) inputs, 3 classes: its prediction differs from
    the label on some inputs, and its input gradient has a closed form."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()


@pytest.mark.parametrize("name", ["fgsm-at", "pgd-at"])
@pytest.mark.parametrize("fast_paths", [True, False])
def test_mixture_gradient_is_the_hand_written_one(name: str, fast_paths: bool) -> None:
    """adv_weight α: the objective's gradient is (1−α)·∇θL(x) + α·∇θL(x_adv), with x_adv from
    an FGSM step written out here (PGD with one step, no random start, is the same attack)."""
    model = _linear_model().train()
    x, y = batch(12, shape=(1, 4, 4))
    x = x.double() * 0.8 + 0.1
    eps, alpha = 0.05, 0.3
    extra = {} if name == "fgsm-at" else {"steps": 1, "rel_stepsize": 1.0, "random_start": False}
    pen = make(name, eps=eps, adv_weight=alpha, **extra)
    assert pen.requires.clean_coeff == pytest.approx(1 - alpha)
    out = Objective([(name, pen, pen.default_lam)], task_weight=pen.task_weight, fast_paths=fast_paths)(model, x, y)
    got = torch.autograd.grad(out.loss, list(model.parameters()))

    w, b = model[1].weight, model[1].bias
    p = torch.softmax(x.flatten(1) @ w.T + b, dim=1).detach()  # (N, 3)
    g = ((p - F.one_hot(y, 3)) @ w.detach()).view_as(x)  # ∇ₓ CE of each sample, closed form
    x_adv = (x + eps * g.sign()).clamp(0, 1)
    ref = (1 - alpha) * F.cross_entropy(model(x), y) + alpha * F.cross_entropy(model(x_adv), y)
    want = torch.autograd.grad(ref, list(model.parameters()))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)
    # standalone (a user's loop): the penalty alone is the mixture, with the same gradient
    alone = make(name, eps=eps, adv_weight=alpha, **extra)(model, x, y)
    torch.testing.assert_close(alone, ref)
    for a, b_ in zip(torch.autograd.grad(alone, list(model.parameters())), want):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["fgsm-at", "pgd-at"])
def test_predicted_labels_attack_the_predicted_class(name: str) -> None:
    """labels="predicted": the perturbation ascends the loss of the model's argmax, not of y. For
    a linear model the FGSM direction is sign((p − onehot(t))ᵀW), so the two label choices give
    different examples exactly where the prediction differs from y."""
    model = _linear_model().eval()
    x, y = batch(24, shape=(1, 4, 4))
    x = x.double() * 0.8 + 0.1
    pred = model(x).argmax(dim=1)
    y = torch.where(torch.arange(len(y)) % 2 == 0, pred, (pred + 1) % 3)  # wrong on every odd row
    assert bool((pred != y).any()) and bool((pred == y).any())
    eps = 0.05
    extra = {} if name == "fgsm-at" else {"steps": 1, "rel_stepsize": 1.0, "random_start": False}
    w, b = model[1].weight.detach(), model[1].bias.detach()
    p = torch.softmax(x.flatten(1) @ w.T + b, dim=1)

    def fgsm(target: torch.Tensor) -> torch.Tensor:
        return (x + eps * ((p - F.one_hot(target, 3)) @ w).view_as(x).sign()).clamp(0, 1)

    predicted = make(name, eps=eps, labels="predicted", adv_weight=1.0, **extra)
    assert not predicted.requires.input_grad  # the shared input gradient is of y's loss
    x_pred = predicted.attack(model, x, y)
    x_true = make(name, eps=eps, **extra).attack(model, x, y)
    torch.testing.assert_close(x_pred, fgsm(pred))
    torch.testing.assert_close(x_true, fgsm(y))
    differs = (x_pred != x_true).flatten(1).any(dim=1)
    assert torch.equal(differs, pred != y)
    # the predicted-label example lowers the predicted class's margin; through the objective
    # (reading the shared clean pass for the prediction) it is the same example
    out = Objective([(name, predicted, 1.0)], task_weight=0.0)(model, x, y)
    torch.testing.assert_close(out.parts[name], F.cross_entropy(model(x_pred), y))


def test_bad_adv_weight_and_labels_rejected() -> None:
    with pytest.raises(ValueError, match="adv_weight"):
        make("pgd-at", adv_weight=1.5)
    with pytest.raises(ValueError, match="labels"):
        make("fgsm-at", labels="leaky")


def test_eps_ramp_grows_linearly_then_holds_and_only_while_training() -> None:
    """FGSM-AT with a 4-step ramp: step t trains on x + ε·min(1, (t+1)/4)·sign g (independent
    FGSM at that radius), evaluation does not advance the clock, the target threat stays ε."""
    torch.manual_seed(0)
    model = models.make("mlp", in_shape=(1, 4, 4), num_classes=5, hidden=(12,)).double().train()
    x = torch.rand(10, 1, 4, 4, dtype=torch.float64) * 0.8 + 0.1
    y = torch.randint(0, 5, (10,))
    eps = 0.2
    pen = make("fgsm-at", eps=eps, adv_weight=1.0, eps_ramp_steps=4)
    assert pen.threat.eps == eps and "step" in pen.state_dict()
    assert "step" not in make("fgsm-at", eps=eps).state_dict()  # no ramp: the state dict is unchanged
    objective = Objective([("fgsm-at", pen, 1.0)], task_weight=0.0)

    def fgsm_loss(radius: float) -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
        return F.cross_entropy(model((x + radius * g.sign()).clamp(0, 1)), y)

    for t in range(6):
        if t == 2:  # an evaluation in eval mode between steps does not move the ramp
            model.eval()
            objective(model, x, y)
            model.train()
        loss = objective(model, x, y).loss
        torch.testing.assert_close(loss, fgsm_loss(eps * min(1.0, (t + 1) / 4)))
    assert int(pen.step) == 6
    with pytest.raises(ValueError, match="eps_ramp_steps"):
        make("pgd-at", eps=eps, eps_ramp_steps=-1)


def test_eps_ramp_pgd_stays_inside_the_ramped_ball() -> None:
    model = bn_net().train()
    x, y = batch(16)
    pen = make("pgd-at", eps=0.3, steps=5, eps_ramp_steps=10)
    assert pen.step_threat().eps == pytest.approx(0.03)
    x_adv = pen.attack(model, x, y)
    assert float((x_adv - x).abs().max()) <= 0.03 * (1 + 1e-5)
    assert float((x_adv - x).abs().max()) > 0.015  # it moved, to the ramped radius
