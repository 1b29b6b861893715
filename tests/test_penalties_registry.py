"""One table for every registered penalty: adding a method adds a row here automatically."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradreg import models, penalties
from gradreg.models.base import Classifier
from gradreg.objective import Objective

SHAPE = (1, 6, 6)
NAMES = penalties.PENALTIES.names()
# parameters that make each member cheap on a tiny input (defaults otherwise)
PARAMS: dict[str, dict] = {"trades": {"steps": 2}, "pgd-at": {"steps": 2}, "opnorm-at": {"steps": 2},
                           "sgr": {"source": "pgd", "pgd_steps": 2, "update_every": 1}}


class ConstantFeatures(nn.Module):
    """Features that ignore the input (kept in the graph with weight 0)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1) + 0.0 * x.flatten(1)[:, :1]


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, *SHAPE), generator=g), torch.randint(0, 10, (n,), generator=g)


def _make(name: str, train_x: torch.Tensor, model: nn.Module) -> penalties.Penalty:
    pen = penalties.make(name, **PARAMS.get(name, {}))
    pen.setup(model, train_x)
    return pen


def _smooth_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = models.make("mlp", in_shape=SHAPE, hidden=(16,))
    for i, m in enumerate(model.features):  # softplus: second derivatives are not zero
        if isinstance(m, nn.ReLU):
            model.features[i] = nn.Softplus()
    return model


def test_registry_has_the_family() -> None:
    expected = {"clean", "wdecay", "datagrad", "lyu", "gn", "sgr", "arr", "trades", "opnorm", "snr", "fgsm-at",
                "pgd-at", "opnorm-at"}
    assert expected <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_finite_differentiable_and_reaches_every_parameter(name: str) -> None:
    model = _smooth_mlp().train()
    x, y = _batch()
    pen = _make(name, x, model)
    value = pen(model, x, y)
    assert value.dim() == 0 and torch.isfinite(value)
    if name == "clean":
        assert value.item() == 0
        return
    grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    named = dict(zip([n for n, _ in model.named_parameters()], grads))
    for pname, g in named.items():
        if name == "wdecay" and pname.endswith("bias"):
            continue  # weight decay leaves biases alone (documented)
        if name == "snr" and (pname.endswith("bias") or "normalize" in pname):
            continue
        if name in ("datagrad", "lyu", "gn", "sgr", "opnorm", "opnorm-at") and pname == "head.bias":
            continue  # neither ∇ₓ of the loss nor f(x) − f(x') depends on the last bias
        if name == "jacreg" and pname == "head.bias":
            continue  # the Jacobian of the logits does not depend on the last bias
        assert g is not None and torch.isfinite(g).all(), f"{name}: no finite gradient for {pname}"
        assert g.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", [n for n in NAMES if penalties.make(n, **PARAMS.get(n, {})).input_dependent])
def test_zero_for_a_model_that_ignores_its_input(name: str) -> None:
    torch.manual_seed(0)
    model = Classifier(ConstantFeatures(5), 5, in_shape=SHAPE, num_classes=10)
    x, y = _batch()
    pen = _make(name, x, model)
    value = pen(model, x, y)
    if pen.task_weight < 1:  # adversarial training: the loss at x_adv, which is the clean loss here
        assert value.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)
    else:
        assert abs(value.item()) < 1e-7, f"{name}: {value.item()}"


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    return Classifier(features, 4 * 36, in_shape=SHAPE, num_classes=10)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("training", [True, False])
def test_modes_restored_and_running_stats_untouched(name: str, training: bool) -> None:
    model = _bn_model().train(training)
    x, y = _batch()
    pen = _make(name, x, model)
    bn = model.features[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    value = pen(model, x, y)
    if value.requires_grad:
        value.backward()
    assert all(m.training == training for m in model.modules())
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]


@pytest.mark.parametrize("name", NAMES)
def test_objective_with_shared_clean_pass_equals_standalone(name: str) -> None:
    """The training loop's shared clean pass must not change a penalty's value."""
    model = _smooth_mlp().eval()  # eval: no dropout/BN differences between the two calls
    x, y = _batch()
    torch.manual_seed(1)
    alone = _make(name, x, model)(model, x, y).item()
    torch.manual_seed(1)
    out = Objective([(name, _make(name, x, model), 1.0)])(model, x, y, index=torch.arange(len(y)))
    assert out.parts.get(name, torch.tensor(0.0)).item() == pytest.approx(alone, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str) -> None:
    model = _smooth_mlp().train()
    x, y = _batch()
    pen = _make(name, x, model)
    for _ in range(2):
        pen(model, x, y, ctx=None)
    clone = _make(name, x, model)
    clone.load_state_dict(pen.state_dict())
    for (k, a), (k2, b) in zip(pen.state_dict().items(), clone.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def _small_cnn() -> nn.Module:
    """Convolutions and ReLUs (the layers gradreg.autodiff reroutes), mode-invariant, float64."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 6, 2, stride=1), nn.ReLU(), nn.Flatten())
    return Classifier(features, 6 * 2 * 2, in_shape=SHAPE, num_classes=10).double()


# every member with its defaults, plus the variants that take other paths through the objective
COMPOSITION_CASES = [(name, {}) for name in NAMES] + [
    # λ ∈ {1, 0.3} > φ = 0.05: a negative clean weight, asked for, so the composition covers it
    ("datagrad", {"solver": "fd", "fd_step": 0.05, "allow_negative_clean": True}), ("datagrad", {"p": 2, "solver": "fd"}),
    ("lyu", {"solver": "onestep"}), ("lyu", {"norm": "l2", "solver": "onestep"}),
    ("arr", {"attack": "pgd", "steps": 2}), ("opnorm", {"form": "uJv"}), ("opnorm", {"warm_start": True}),
    # adversarial training as the SGR paper defines it: a clean/adversarial mixture, predicted labels
    ("fgsm-at", {"labels": "predicted"}), ("fgsm-at", {"adv_weight": 1.0}),
    ("pgd-at", {"adv_weight": 0.5}), ("pgd-at", {"adv_weight": 0.5, "labels": "predicted"}),
    ("sgr", {"labels": "predicted"}), ("sgr", {"source": "fgsm", "labels": "predicted"}),
]


def _objective_grads(name: str, extra: dict, lam: float, *, fast_paths: bool, model: nn.Module,
                     x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    pen = penalties.make(name, **{**PARAMS.get(name, {}), **extra})
    pen.setup(model, x)
    torch.manual_seed(1)
    out = Objective([(name, pen, lam)], task_weight=pen.task_weight, fast_paths=fast_paths)(
        model, x, y, index=torch.arange(len(y)))
    return out.loss, torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)


def _assert_same(name: str, extra: dict, lam: float, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    plain, want = _objective_grads(name, extra, lam, fast_paths=False, model=model, x=x, y=y)
    fast, got = _objective_grads(name, extra, lam, fast_paths=True, model=model, x=x, y=y)
    assert fast.item() == pytest.approx(plain.item(), rel=1e-9, abs=1e-12)
    for w, g in zip(want, got):
        w = torch.zeros_like(g) if w is None and g is not None else w
        g = torch.zeros_like(w) if g is None and w is not None else g
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name,extra", COMPOSITION_CASES)
@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_fast_paths_give_the_plain_composition(name: str, extra: dict, lam: float) -> None:
    """The scheduler's shortcuts — fused clean pass, one-step attacks and TRADES' p(x) read from
    the shared pass, first-order kernels for double backprop, the task term dropped at weight 0 —
    give the value and parameter gradient of the plain composition task_weight·CE(f(x), y) +
    λ·penalty (``fast_paths=False``: each penalty on its own clean pass, standard autograd).
    The table is the registry, so a penalty registered by a third party is covered too."""
    x, y = _batch()
    _assert_same(name, extra, lam, _small_cnn().train(), x.double(), y)


def test_plain_composition_is_what_a_user_loop_computes() -> None:
    """fast_paths=False is task_weight·CE + λ·pen(model, x, y), computed independently here."""
    model = _small_cnn().train()
    x, y = _batch()
    x = x.double()
    pen = penalties.make("datagrad", solver="fd", fd_step=0.5)
    torch.manual_seed(1)
    plain = F.cross_entropy(model(x), y) + 0.3 * pen(model, x, y)
    want = torch.autograd.grad(plain, list(model.parameters()))
    loss, got = _objective_grads("datagrad", {"solver": "fd", "fd_step": 0.5}, 0.3, fast_paths=False,
                                 model=model, x=x, y=y)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-12)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


class _ThirdParty(penalties.Penalty):
    """A penalty from outside gradreg: ½‖∇ₓL‖₂² in a dozen lines (registered in the test below)."""

    requires = penalties.Requirements(input_grad=True, double_backward=True)

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: penalties.CleanPass) -> penalties.Term:
        return penalties.Term(0.5 * ctx.input_grad().pow(2).flatten(1).sum(dim=1).mean())


def test_a_third_party_penalty_joins_the_table() -> None:
    penalties.PENALTIES.register("third-party-gn")(_ThirdParty)
    try:
        assert "third-party-gn" in penalties.PENALTIES.names()
        x, y = _batch()
        _assert_same("third-party-gn", {}, 0.5, _small_cnn().train(), x.double(), y)
    finally:  # leave the registry as the other tests see it
        penalties.PENALTIES._factories.pop("third-party-gn")
        penalties.PENALTIES._docs.pop("third-party-gn")


def test_the_architecture_docs_example_penalty_works() -> None:
    """docs/ARCHITECTURE.md's "how to add a penalty" runs as written: registered, the value is
    ½‖∇ₓL‖₂² (checked per sample against autograd), and fast paths give the plain composition."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## How to add a penalty", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(code.strip().splitlines()) <= 20
    try:
        exec(compile(code, "ARCHITECTURE.md", "exec"), {})  # noqa: S102 - our own documentation
        model = _small_cnn().train()
        x, y = _batch()
        x = x.double()
        pen = penalties.make("my-gn")
        grads = []
        for i in range(len(x)):  # each sample's own input gradient, one at a time
            xi = x[i:i + 1].clone().requires_grad_(True)
            grads.append(torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)[0])
        want = 0.5 * torch.cat(grads).pow(2).flatten(1).sum(dim=1).mean()
        assert pen(model, x, y).item() == pytest.approx(want.item(), rel=1e-10)
        _assert_same("my-gn", {}, 0.7, model, x, y)
    finally:
        penalties.PENALTIES._factories.pop("my-gn", None)
        penalties.PENALTIES._docs.pop("my-gn", None)
