"""DataGrad (SPEC §1): exact penalty against a per-sample reference, gradcheck, the
finite-difference solver converging to the exact one, the FGSM-mix identity, multi-task."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from gradreg.models.base import Classifier
from gradreg.objective import Objective
from gradreg.penalties.base import CleanPass
from gradreg.penalties import make
from gradreg.penalties.datagrad import DataGrad

IN_SHAPE = (1, 4, 4)
CONFIGS = [dict(p=1), dict(p=2), dict(p=2, squared=True)]


def tiny_model(*, aux: tuple[int, ...] = (), seed: int = 0, bn: bool = False) -> Classifier:
    """2-layer tanh MLP on 1×4×4 inputs, float64 (tanh: second derivatives are not zero)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(16, 6)]
    if bn:
        layers.append(nn.BatchNorm1d(6))
    layers.append(nn.Tanh())
    model = Classifier(nn.Sequential(*layers), 6, in_shape=IN_SHAPE, num_classes=3, aux_classes=aux)
    return model.double()


def batch(n: int = 5, tasks: int = 1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *IN_SHAPE, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n, tasks), generator=g)
    return x, (y[:, 0] if tasks == 1 else y)


def reference_R(g: torch.Tensor, cfg: dict) -> torch.Tensor:
    if cfg["p"] == 1:
        return g.abs().sum()
    if cfg.get("squared"):
        return 0.5 * (g * g).sum()
    return torch.sqrt((g * g).sum())


def reference_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: dict, head: int = 0) -> torch.Tensor:
    """mean_i R(∇_{x_i} CE_i), one sample at a time with its own loss (independent of CleanPass)."""
    values = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        logits = model(xi, all_heads=True)[head] if head else model(xi)
        (gi,) = torch.autograd.grad(F.cross_entropy(logits, y[i:i + 1]), xi, create_graph=True)
        values.append(reference_R(gi, cfg))
    return torch.stack(values).mean()


def param_grads(value: torch.Tensor, model: nn.Module) -> torch.Tensor:
    grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, model.parameters())])


@pytest.mark.parametrize("cfg", CONFIGS, ids=["l1", "l2", "sq"])
def test_exact_matches_per_sample_reference(cfg: dict) -> None:
    model = tiny_model()
    x, y = batch()
    pen = make("datagrad", solver="exact", **cfg)
    value = pen(model, x, y)
    ref = reference_penalty(model, x, y, cfg)
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(param_grads(value, model), param_grads(ref, model), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["l1", "l2", "sq"])
def test_exact_gradcheck(cfg: dict) -> None:
    model = tiny_model()
    x, y = batch(n=3)
    pen = DataGrad(solver="exact", **cfg)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def fn(*ps: torch.Tensor) -> torch.Tensor:
        # the penalty as a function of the parameters (CleanPass detaches x by design)
        class Wrapped(nn.Module):
            def forward(self, inp: torch.Tensor, **kw: object) -> torch.Tensor:
                return functional_call(model, dict(zip(names, ps)), (inp,), kw)

        return pen(Wrapped(), x, y)

    assert torch.autograd.gradcheck(fn, params, fast_mode=True)
    if cfg.get("squared"):  # third derivatives of the loss, once
        assert torch.autograd.gradgradcheck(fn, params, fast_mode=True)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["l1", "l2", "sq"])
def test_fd_converges_to_exact(cfg: dict) -> None:
    model = tiny_model()
    x, y = batch()
    exact = DataGrad(solver="exact", **cfg)(model, x, y)
    g_exact = param_grads(exact, model)
    errors = []
    for step in (1e-1, 1e-2, 1e-3, 1e-4):
        fd = DataGrad(solver="fd", fd_step=step, **cfg)(model, x, y)
        torch.testing.assert_close(fd, exact.detach(), rtol=1e-10, atol=1e-12)  # value: exact R(g)
        errors.append(float((param_grads(fd, model) - g_exact).norm() / g_exact.norm()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3, errors
    assert errors[-1] < errors[0] / 100, errors  # first order in φ


def test_fd_gradient_is_fgsm_mix() -> None:
    """With λ/φ = 1 − α, L + λ·DGL1_fd has the gradient of α·L(x) + (1−α)·L(x + φ·sign g)."""
    model = tiny_model()
    x, y = batch()
    phi, alpha = 0.05, 0.3
    out = Objective([("dg", DataGrad(p=1, solver="fd", fd_step=phi), (1 - alpha) * phi)])(model, x, y)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    mix = alpha * F.cross_entropy(model(x), y) + (1 - alpha) * F.cross_entropy(model(x + phi * g.sign()), y)
    torch.testing.assert_close(param_grads(out.loss, model), param_grads(mix, model), rtol=1e-10, atol=1e-12)


def test_multitask_is_weighted_sum_of_tasks() -> None:
    model = tiny_model(aux=(2,))
    x, y = batch(tasks=2)
    cfg = dict(p=2)
    lams = (0.5, 2.0)
    value = DataGrad(task_lams=lams, **cfg)(model, x, y)
    ref = sum(lam * reference_penalty(model, x, y[:, t], cfg, head=t) for t, lam in enumerate(lams))
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(param_grads(value, model), param_grads(ref, model), rtol=1e-9, atol=1e-12)
    # default: every task weighs 1; fd has the same value
    default = DataGrad(**cfg)(model, x, y)
    torch.testing.assert_close(default, reference_penalty(model, x, y[:, 0], cfg)
                               + reference_penalty(model, x, y[:, 1], cfg, head=1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(DataGrad(solver="fd", **cfg)(model, x, y), default.detach(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="task_lams"):
        DataGrad(task_lams=(1.0,), **cfg)(model, x, y)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["l1", "l2", "sq"])
@pytest.mark.parametrize("solver", ["exact", "fd"])
def test_model_ignoring_input_gives_zero_and_finite_grads(cfg: dict, solver: str) -> None:
    model = tiny_model()
    with torch.no_grad():
        model.features[1].weight.zero_()  # logits no longer depend on x: g = 0
    x, y = batch()
    value = DataGrad(solver=solver, **cfg)(model, x, y)
    assert float(value.detach()) == 0.0
    assert torch.isfinite(param_grads(value, model)).all()


def test_fd_pass_keeps_mode_and_batchnorm_statistics() -> None:
    model = tiny_model(bn=True).train()
    reference = tiny_model(bn=True).train()
    x, y = batch(n=8)
    ctx = CleanPass(model, x, y, need_input_grad=True)  # the training loop's clean pass (train mode)
    value = DataGrad(solver="fd", fd_step=0.5)(model, x, y, ctx=ctx)  # + the perturbed pass
    assert torch.isfinite(param_grads(value, model)).all()  # the graph survives the extra pass
    reference(x)  # the clean pass alone
    bn, bn_ref = model.features[2], reference.features[2]
    assert model.training and bn.training
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == 1


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        make("datagrad", p=3)
    with pytest.raises(ValueError):
        make("datagrad", p=1, squared=True)
    with pytest.raises(ValueError):
        make("datagrad", solver="newton")
    with pytest.raises(TypeError):
        DataGrad(1)  # type: ignore[misc]  # hyper-parameters are keyword-only


def test_fd_refuses_negative_clean_weight_unless_asked() -> None:
    """λ > φ weighs the clean loss by 1 − λ/φ < 0 (module doc): refused with a one-line
    ConfigError; λ = φ (clean weight 0) passes; allow_negative_clean=True builds it, and its
    gradient is still (1 − λ/φ)·∇L(x) + (λ/φ)·∇L(x + φ·sign g), computed here by hand."""
    from gradreg.config import ConfigError
    model = tiny_model()
    x, y = batch()
    phi = 0.05
    with pytest.raises(ConfigError, match=r"λ = 0.1 .*φ = fd_step = 0.05.*allow_negative_clean") as err:
        Objective([("dg", DataGrad(p=1, solver="fd", fd_step=phi), 2 * phi)])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError):  # a task weight w₀ = ½ halves the allowed λ
        Objective([("dg", DataGrad(p=1, solver="fd", fd_step=phi), 0.75 * phi)], task_weight=0.5)
    Objective([("dg", DataGrad(p=1, solver="fd", fd_step=phi), phi)])  # clean weight exactly 0
    Objective([("dg", DataGrad(p=1, solver="exact"), 10.0)])  # the exact solver has no clean weight
    out = Objective([("dg", DataGrad(p=1, solver="fd", fd_step=phi, allow_negative_clean=True), 2 * phi)])(model, x, y)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    mix = -1.0 * F.cross_entropy(model(x), y) + 2.0 * F.cross_entropy(model(x + phi * g.sign()), y)
    torch.testing.assert_close(param_grads(out.loss, model), param_grads(mix, model), rtol=1e-10, atol=1e-12)
