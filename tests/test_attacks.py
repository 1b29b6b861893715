"""Attacks and the judge (gradreg.judge).

One table (``FAST``) holds a fast configuration of every registered attack; the invariant tests
iterate over the registry, so registering an attack without adding a row fails. References are
independent: IBM ART for FGSM, PGD and DeepFool, an explicit covariance matrix for LRC, and
separate per-ε runs for the multi-ε curves.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from gradreg import ThreatModel, judge
from gradreg.attacks import ATTACKS, Attack, make
from gradreg.inference import accuracy, predict
from gradreg.attacks.gradient import random_targets
from gradreg.attacks.lrc import lrc_noise
from gradreg.registry import UnknownNameError

# a fast configuration of every registered attack (adding an attack adds a row)
FAST: dict[str, dict[str, object]] = {
    "fgsm": {},
    "fgm": {},
    "pgd": {"steps": 10},
    "tpgd": {"steps": 10},
    "tpgd-all": {"steps": 5},
    "deepfool": {},
    "uniform": {"samples": 8},
    "gaussian": {"samples": 8},
    "lrc": {"samples": 20, "zeta_px": 2.0},
    "autoattack": {"version": "custom", "attacks": ["apgd-ce"], "n_iter": 10, "n_restarts": 1},
}
# radii that hurt a clean digits model; noise needs larger ones (LRC: a noise strength)
EPS_GRAD = {"linf": 0.1, "l2": 0.75, "l1": 3.0}
EPS_NOISE = {"linf": 0.5, "l2": 3.0, "l1": 12.0}
NOISE = ("uniform", "gaussian", "lrc")
N_TEST = 120


def _norms(name: str) -> tuple[str, ...]:
    norms = make(name, **FAST[name]).norms
    return tuple(n for n in norms if n != "l1") if name == "autoattack" else norms  # keep AutoAttack short


CASES = [(name, norm) for name in ATTACKS for norm in (_norms(name) if name in FAST else ("linf",))]


def _eps(name: str, norm: str) -> float:
    if name == "lrc":
        return 0.3  # a noise strength (marginal std), whatever the norm
    return (EPS_NOISE if name in NOISE else EPS_GRAD)[norm]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    """The tensors here are tiny (8×8 digits): on a shared 2-core machine, intra-op threads spin
    and wait on each other (we measured DeepFool 50× slower with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch(digits):  # type: ignore[no-untyped-def]
    return digits.test_x[:N_TEST], digits.test_y[:N_TEST]


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_every_attack_has_a_test_row() -> None:
    assert set(FAST) == set(ATTACKS), "add a fast configuration of the new attack to FAST"


# ---------------------------------------------------------------------------------------------
# invariants for every registered attack
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,norm", CASES)
def test_attack_invariants(name, norm, digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    x, y = batch
    attack = make(name, **FAST[name])
    threat = ThreatModel(norm, _eps(name, norm), (0.0, 1.0))
    x_adv = attack(digits_cw, x, y, threat)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    # inside the bounds, and inside the ball (float tolerance) unless ε is a noise strength
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if attack.eps_is_radius:
        dist = threat.distance(x, x_adv)
        assert float(dist.max()) <= threat.eps * (1 + 1e-5) + 1e-6, float(dist.max())
    else:
        projected = make(name, **FAST[name], project=True)(digits_cw, x, y, threat)
        assert float(threat.distance(x, projected).max()) <= threat.eps * (1 + 1e-5) + 1e-6
    # accuracy strictly falls on a trained model
    clean = _acc(digits_cw, x, y)
    assert _acc(digits_cw, x_adv, y) < clean
    # ε = 0 reproduces clean accuracy exactly (and the clean predictions)
    x_0 = attack(digits_cw, x, y, threat.with_eps(0.0))
    with torch.no_grad():
        assert torch.equal(digits_cw(x_0).argmax(1), digits_cw(x).argmax(1))
    assert _acc(digits_cw, x_0, y) == clean


class _Net(nn.Module):
    """Tiny untrained net with BatchNorm and Dropout that records the mode of each forward and
    can raise inside its forward."""

    def __init__(self) -> None:
        super().__init__()
        # BatchNorm2d works on a single sample in train mode (attacks may probe with x[:1])
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
                                  nn.Flatten(), nn.Linear(256, 10))
        self.seen: list[bool] = []
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        if self.fail:
            raise RuntimeError("boom inside the model")
        return self.body(x)


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_restores_mode(name, digits) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = _Net()
    net.train()
    net.body[1].eval()  # mixed modes must come back exactly
    before = _modes(net)
    x, y = digits.test_x[:16], digits.test_y[:16]
    norm = make(name, **FAST[name]).norms[0]
    threat = ThreatModel(norm, 0.5, (0.0, 1.0))
    make(name, **FAST[name])(net, x, y, threat)
    assert _modes(net) == before
    assert net.seen and not any(net.seen), "attacks run the model in eval mode by default"

    net.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        make(name, **FAST[name])(net, x, y, threat)
    assert _modes(net) == before
    net.fail = False

    # explicit BatchNorm policy: train-mode forward passes, running statistics untouched
    stats = [b.clone() for b in net.body[1].buffers()]
    net.seen.clear()
    make(name, **FAST[name], bn_policy="frozen")(net, x, y, threat)
    assert any(net.seen)
    assert all(torch.equal(a, b) for a, b in zip(stats, net.body[1].buffers()))
    assert _modes(net) == before


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_respects_other_bounds(name, digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    """Inputs in [−1, 1]: no attack may assume [0, 1]."""
    x, y = batch[0][:60], batch[1][:60]

    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = digits_cw

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.inner((z + 1) / 2)

    model = Shifted().eval()
    z = 2 * x - 1
    attack = make(name, **FAST[name])
    norm = attack.norms[0]
    threat = ThreatModel(norm, 2 * _eps(name, norm), (-1.0, 1.0))
    z_adv = attack(model, z, y, threat)
    assert float(z_adv.min()) >= -1.0 and float(z_adv.max()) <= 1.0
    assert float(z_adv.min()) < 0.0  # really in the shifted box, not clamped into [0, 1]
    if attack.eps_is_radius:
        assert float(threat.distance(z, z_adv).max()) <= threat.eps * (1 + 1e-5) + 1e-6
    assert _acc(model, z_adv, y) < _acc(model, z, y)


# ---------------------------------------------------------------------------------------------
# against IBM ART (independent implementation)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def art_classifier(digits_cw, digits):  # type: ignore[no-untyped-def]
    pytest.importorskip("art")
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=digits_cw, loss=nn.CrossEntropyLoss(), input_shape=digits.in_shape,
                             nb_classes=10, clip_values=(0.0, 1.0))


def test_fgsm_identical_to_art(art_classifier, digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    from art.attacks.evasion import FastGradientMethod

    x, y = batch
    eps = 0.1
    ours = make("fgsm")(digits_cw, x, y, ThreatModel("linf", eps, (0.0, 1.0)))
    ref = FastGradientMethod(art_classifier, norm=np.inf, eps=eps, batch_size=len(x)).generate(x.numpy(), y=y.numpy())
    assert torch.equal(ours, torch.from_numpy(ref))


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.75)])
def test_pgd_matches_art(norm, eps, art_classifier, digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    from art.attacks.evasion import ProjectedGradientDescent

    x, y = batch
    # NCHW strides, as ART's numpy round trip gives: the same convolution layout on both sides
    # (gradreg keeps the input's layout through the iterations; the rounding differs by layout)
    x = x.clone(memory_format=torch.contiguous_format)
    steps, rel = 10, 0.1
    ours = make("pgd", steps=steps, rel_stepsize=rel, random_start=False)(digits_cw, x, y,
                                                                          ThreatModel(norm, eps, (0.0, 1.0)))
    ref = ProjectedGradientDescent(art_classifier, norm=np.inf if norm == "linf" else 2, eps=eps,
                                   eps_step=rel * eps, max_iter=steps, num_random_init=0, batch_size=len(x),
                                   verbose=False).generate(x.numpy(), y=y.numpy())
    torch.testing.assert_close(ours, torch.from_numpy(ref), rtol=0, atol=1e-5)


def test_deepfool_rho_matches_art(art_classifier, digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    from art.attacks.evasion import DeepFool

    x, y = batch[0][:60], batch[1][:60]
    ref = torch.from_numpy(DeepFool(art_classifier, max_iter=50, epsilon=0.02, nb_grads=10, batch_size=len(x),
                                    verbose=False).generate(x.numpy()))
    rho_ref = float(((ref - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).mean())
    rho = judge.deepfool_rho(digits_cw, x, y, bounds=(0.0, 1.0))
    assert rho == pytest.approx(rho_ref, rel=0.05)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_reaches_the_boundary(norm, digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    x, y = batch
    df = make("deepfool", labels="predicted")
    x_min = df.minimal(digits_cw, x, y, ThreatModel(norm, 0.0, (0.0, 1.0)))
    with torch.no_grad():
        pred = digits_cw(x).argmax(1)
        assert float((digits_cw(x_min).argmax(1) == pred).float().mean()) <= 0.01  # accuracy ≈ 0
        # and not far beyond it: half the perturbation leaves most predictions unchanged
        half = digits_cw(x + 0.5 * (x_min - x)).argmax(1)
        assert float((half == pred).float().mean()) >= 0.8


# ---------------------------------------------------------------------------------------------
# multi-ε curves and the judge
# ---------------------------------------------------------------------------------------------
DETERMINISTIC = [("fgsm", {}, "linf", [0.1, 0.0, 0.05, 0.2]),
                 ("fgm", {}, "l2", [0.5, 0.0, 1.5]),
                 ("pgd", {"steps": 5, "random_start": False, "sweep": "carry"}, "linf", [0.05, 0.0, 0.1, 0.2]),
                 ("deepfool", {}, "l2", [0.0, 0.25, 0.5, 1.0])]


@pytest.mark.parametrize("name,params,norm,eps_list", DETERMINISTIC)
def test_success_curve_equals_separate_runs(name, params, norm, eps_list, digits_cw,  # type: ignore[no-untyped-def]
                                            batch) -> None:
    x, y = batch
    attack = make(name, **params)
    assert attack.deterministic
    threat = ThreatModel(norm, 0.0, (0.0, 1.0))
    curve = attack.success_curve(digits_cw, x, y, threat, eps_list)  # (K, N)
    assert curve.shape == (len(eps_list), len(y)) and curve.dtype == torch.bool
    with torch.no_grad():
        separate = {e: digits_cw(attack(digits_cw, x, y, threat.with_eps(e))).argmax(1) != y for e in eps_list}
        expected_any = digits_cw(x).argmax(1) != y
    # an example found at a smaller ε is one at every larger ε: the curve is cumulative
    for k, e in sorted(enumerate(eps_list), key=lambda t: t[1]):
        expected_any = expected_any | separate[e]
        assert torch.equal(curve[k], expected_any), (name, e)
    # and the judge, judging by itself, agrees
    accs = judge.robust_accuracy(digits_cw, x, y, attack, threat, eps_list, batch_size=50, progress=False)
    for k, _ in enumerate(eps_list):
        assert accs[k] == pytest.approx(1.0 - int(curve[k].sum()) / len(y), abs=1e-12)


# the fast sweep (gradreg.attacks.curves), in accuracy points: the issue asks for 0.5 on 500
# MNIST-10k points (benchmarks/curves.py); on these 360 digits points fresh PGD with another seed
# already moves the curve by about 1 point (4 images), so one seeded comparison gets 1.5
FAST_SWEEP_TOLERANCE = 1.5


def test_fast_sweep_matches_fresh_pgd_at_every_eps(digits_cw, digits) -> None:  # type: ignore[no-untyped-def]
    """The bisection sweep's curve against PGD run afresh at every ε with the same steps, step
    size and seed, all 360 test points: never more than 1.5 points above it (the fast curve must
    not claim robustness that fresh PGD breaks; PGD's own seed noise here is about 1 point), and
    at most 2 points below (the early stops make it stronger)."""
    x, y = digits.test_x, digits.test_y
    threat = ThreatModel("linf", 0.0, (0.0, 1.0))
    grid = [0.02 * i for i in range(1, 7)]
    fast_attack = make("pgd", steps=10, labels="predicted", sweep="fast")
    assert fast_attack.fast_sweep_applies(grid)
    fast = judge.robust_accuracy(digits_cw, x, y, fast_attack, threat, [0.0, *grid], progress=False)
    fresh_attack = make("pgd", steps=10, labels="predicted", sweep="carry")
    fresh = [judge.robust_accuracy(digits_cw, x, y, fresh_attack, threat, [e], progress=False)[0] for e in grid]
    assert fast[0] == pytest.approx(accuracy(digits_cw, x, y))
    assert fresh[-1] < 0.5 < fresh[0]  # the grid spans the curve
    for e, a, f in zip(grid, fresh, fast[1:]):
        assert -2.0 <= 100 * (f - a) <= FAST_SWEEP_TOLERANCE, (e, a, f)


def test_fast_sweep_keeps_the_fresh_paths(digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    """carry_over=False (the raw per-ε curve, transfer) and one radius run exactly as before."""
    x, y = batch
    threat = ThreatModel("linf", 0.0, (0.0, 1.0))
    fast, carry = make("pgd", steps=3, sweep="fast"), make("pgd", steps=3, sweep="carry")
    eps = [0.0, 0.05, 0.1]
    assert torch.equal(fast.perturb_multi(digits_cw, x, y, threat, eps, carry_over=False),
                       carry.perturb_multi(digits_cw, x, y, threat, eps, carry_over=False))
    assert torch.equal(fast.perturb_multi(digits_cw, x, y, threat, [0.0, 0.1]),
                       carry.perturb_multi(digits_cw, x, y, threat, [0.0, 0.1]))
    assert not make("fgsm").fast_sweep_applies(eps) and not make("tpgd", steps=3).fast_sweep_applies(eps)
    with pytest.raises(ValueError, match="sweep"):
        make("pgd", sweep="quick")


def test_pgd_until_fooled_follows_pgd_and_stops_at_the_first_success(digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    from gradreg.attacks.pgd_core import ce_loss, pgd, pgd_until_fooled

    x, y = batch
    threat = ThreatModel("linf", 0.08, (0.0, 1.0))
    start = threat.random_start(x, torch.Generator().manual_seed(0))
    x_adv, fooled = pgd_until_fooled(digits_cw, x, y, threat, steps=5, rel_stepsize=0.5, eps=0.08, start=start)
    reference = pgd(digits_cw, x, threat, ce_loss(y), steps=5, rel_stepsize=0.5, random_start=False, start=start)
    assert threat.contains(x, x_adv).all()
    assert torch.equal(fooled, predict(digits_cw, x_adv) != y)  # a stopped row is misclassified
    ref_fooled = predict(digits_cw, reference) != y
    assert bool((fooled | ~ref_fooled).all()) and 0 < int(fooled.sum()) < len(y)  # no success lost
    assert torch.allclose(x_adv[~fooled], reference[~fooled], atol=1e-6)  # the same iterates otherwise


def test_judge_eps_zero_is_clean_accuracy(digits_cw, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits.test_x, digits.test_y
    clean = accuracy(digits_cw, x, y, batch_size=100)
    report = judge.evaluate_attack(digits_cw, x, y, make("fgsm"), ThreatModel("linf", 0.0, (0.0, 1.0)),
                                   [0, "1/255", 0.1], batch_size=100, progress=False)
    assert report.robust_accuracy[0] == clean == report.clean_accuracy
    assert report.robust_accuracy[2] <= report.robust_accuracy[1] <= clean
    assert report.robust.shape == (3, len(y))
    assert report.eps[1] == pytest.approx(1 / 255)


class _Cheat(Attack):
    """Returns points outside the ball (2ε along a fixed sign pattern), or NaN."""

    def __init__(self, mode: str) -> None:
        super().__init__(name="cheat", norms=("linf",))
        self.mode = mode

    def _perturb(self, model, x, y, threat):  # type: ignore[no-untyped-def]
        if self.mode == "nan":
            return torch.full_like(x, float("nan"))
        return threat.clip(x + 2 * threat.eps * torch.ones_like(x))


def test_judge_never_trusts_an_attack(digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    x, y = batch
    threat = ThreatModel("linf", 0.2, (0.0, 1.0))
    with pytest.raises(judge.AttackViolation, match="outside"):
        judge.robust_accuracy(digits_cw, x, y, _Cheat("far"), threat, [0.2], progress=False)
    with pytest.raises(judge.AttackViolation):
        judge.robust_accuracy(digits_cw, x, y, _Cheat("nan"), threat, [0.2], progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc = judge.robust_accuracy(digits_cw, x, y, _Cheat("far"), threat, [0.2], on_violation="warn",
                                       progress=False)
    assert any("outside" in str(w.message) for w in caught)
    # judged on the re-projected points, by the judge itself
    fixed = threat.project(x, (x + 0.4).clamp(0, 1))
    with torch.no_grad():
        ok = (digits_cw(x).argmax(1) == y) & (digits_cw(fixed).argmax(1) == y)
    assert acc[0] == int(ok.sum()) / len(y)


class _Spy(Attack):
    """Records the labels it is given; claims success everywhere but returns x."""

    def __init__(self) -> None:
        super().__init__(name="spy", norms=("linf",))
        self.got: list[torch.Tensor] = []

    def _perturb(self, model, x, y, threat):  # type: ignore[no-untyped-def]
        self.got.append(y.clone())
        return x.clone()

    def success_curve(self, model, x, y, threat, eps_list):  # type: ignore[no-untyped-def]
        return torch.ones(len(eps_list), len(y), dtype=torch.bool)


def test_judge_labels_flag_and_judging(digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    x, y = batch
    wrong = (y + 1) % 10  # every label wrong: only predicted labels make sense now
    spy = _Spy()
    acc = judge.robust_accuracy(digits_cw, x, wrong, spy, ThreatModel("linf", 0.1, (0, 1)), [0.1],
                                   labels="predicted", progress=False)
    with torch.no_grad():
        pred = digits_cw(x).argmax(1)
    assert torch.equal(torch.cat(spy.got), pred)
    assert acc == [int((pred == wrong).sum()) / len(y)]  # the judge ignores the spy's claims


def test_labels_predicted_equals_attacking_the_predictions(digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    x, y = batch
    threat = ThreatModel("linf", 0.1, (0.0, 1.0))
    with torch.no_grad():
        pred = digits_cw(x).argmax(1)
    a = make("pgd", steps=3, random_start=False, labels="predicted")(digits_cw, x, (y + 3) % 10, threat)
    b = make("pgd", steps=3, random_start=False, labels="true")(digits_cw, x, pred, threat)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="labels"):
        make("pgd", labels="leaky")


def test_judge_is_independent_of_batch_size(digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    x, y = batch
    threat = ThreatModel("linf", 0.0, (0.0, 1.0))
    a = judge.robust_accuracy(digits_cw, x, y, make("fgsm"), threat, [0.05, 0.1], batch_size=7, progress=False)
    b = judge.robust_accuracy(digits_cw, x, y, make("fgsm"), threat, [0.05, 0.1], batch_size=1000,
                                 progress=False)
    assert a == b


def test_transfer_from_a_source_model(digits_cw, digits_mlp, batch) -> None:  # type: ignore[no-untyped-def]
    x, y = batch
    threat = ThreatModel("linf", 0.0, (0.0, 1.0))
    transfer = judge.robust_accuracy(digits_cw, x, y, make("fgsm"), threat, [0.2], source_model=digits_mlp,
                                        progress=False)
    x_adv = make("fgsm")(digits_mlp, x, y, threat.with_eps(0.2))
    with torch.no_grad():
        ok = (digits_cw(x).argmax(1) == y) & (digits_cw(x_adv).argmax(1) == y)
    assert transfer == [int(ok.sum()) / len(y)]


# ---------------------------------------------------------------------------------------------
# targeted PGD, noise, LRC, AutoAttack specifics
# ---------------------------------------------------------------------------------------------
def test_tpgd_targets_and_seed(digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    x, y = batch
    targets = random_targets(digits_cw, x, y, torch.Generator().manual_seed(0))
    assert bool((targets != y).all()) and len(set(targets.tolist())) == 10
    threat = ThreatModel("linf", 0.3, (0.0, 1.0))
    a = make("tpgd", steps=10, seed=0)(digits_cw, x, y, threat)
    assert torch.equal(a, make("tpgd", steps=10, seed=0)(digits_cw, x, y, threat))
    assert not torch.equal(a, make("tpgd", steps=10, seed=1)(digits_cw, x, y, threat))
    with torch.no_grad():
        # the attack draws its targets first from its seeded generator: the same targets as above
        hit = digits_cw(a).argmax(1) == targets
    assert float(hit.float().mean()) > 0.5


def test_worst_of_k_counts_a_point_only_if_all_copies_are_correct() -> None:
    class Threshold(nn.Module):  # class 1 iff the first pixel exceeds 0.6
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = x.flatten(1)[:, :1] - 0.6
            return torch.cat([-v, v], dim=1)

    model = Threshold()
    x = torch.full((2000, 1, 2, 2), 0.5)
    y = torch.zeros(2000, dtype=torch.long)
    threat = ThreatModel("linf", 0.2, (0.0, 1.0))  # a copy fools with probability 1/4
    for k in (1, 2, 30):
        x_adv = make("uniform", samples=k, seed=1)(model, x, y, threat)
        fooled = float((predict(model, x_adv) != y).float().mean())
        assert fooled == pytest.approx(1 - 0.75**k, abs=0.04), k
        assert float(threat.distance(x, x_adv).max()) <= 0.2 + 1e-6


def _reference_lrc_covariance(shape: tuple[int, int, int], zeta: float) -> torch.Tensor:
    """Σ_LRC entry by entry, by definition (no Kronecker structure, no vectorization)."""
    c, h, w = shape
    idx = [(ch, i, j) for ch in range(c) for i in range(h) for j in range(w)]
    cov = torch.empty(len(idx), len(idx), dtype=torch.float64)
    for a, (ca, ia, ja) in enumerate(idx):
        for b, (cb, ib, jb) in enumerate(idx):
            r = math.hypot(ia - ib, ja - jb)
            cov[a, b] = (1.0 if ca == cb else 0.5) * math.exp(-r / zeta)
    return cov


def _covariance_function(cov: torch.Tensor, shape: tuple[int, int, int]) -> dict[tuple[bool, int], float]:
    """Average covariance over pixel pairs at each rounded displacement, intra/inter channel."""
    c, h, w = shape
    ch = torch.arange(c).repeat_interleave(h * w)
    rows = torch.arange(h).repeat_interleave(w).repeat(c)
    cols = torch.arange(w).repeat(h * c)
    disp = torch.sqrt((rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2.0).round().long()
    same = ch[:, None] == ch[None]
    out = {}
    for intra in (True, False):
        for r in range(int(disp.max()) + 1):
            mask = (disp == r) & (same if intra else ~same)
            if mask.any():
                out[(intra, r)] = float(cov[mask].mean())
    return out


@pytest.mark.parametrize("zeta", [1.0, 4.0])
def test_lrc_samples_have_the_requested_covariance(zeta) -> None:  # type: ignore[no-untyped-def]
    shape = (3, 5, 5)
    n = 40000
    xi = lrc_noise(n, shape, zeta_px=zeta, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flat = xi.reshape(n, -1)
    emp = flat.T @ flat / n  # (75, 75) the mean is zero by construction
    ref = _reference_lrc_covariance(shape, zeta)
    assert float((emp - ref).abs().max()) < 0.06
    emp_fn, ref_fn = _covariance_function(emp, shape), _covariance_function(ref, shape)
    assert emp_fn.keys() == ref_fn.keys()
    for key in ref_fn:
        assert emp_fn[key] == pytest.approx(ref_fn[key], abs=0.02), key
    assert ref_fn[(True, 0)] == 1.0 and ref_fn[(False, 0)] == 0.5


def test_lrc_attack_scales_by_eps_and_clips() -> None:
    attack = make("lrc", zeta_px=2.0)
    x = torch.full((1, 1, 6, 6), 0.5)
    small = ThreatModel("linf", 0.01, (0.0, 1.0))  # no clipping at this strength
    copies = attack.sample(x, small, 4000, torch.Generator().manual_seed(0))  # (4000, 1, 1, 6, 6)
    xi = ((copies - x) / 0.01).reshape(4000, 36)
    assert float(xi.var(dim=0).mean()) == pytest.approx(1.0, abs=0.08)
    neighbours = float((xi[:, 0] * xi[:, 1]).mean())  # horizontal displacement 1
    assert neighbours == pytest.approx(math.exp(-1 / 2.0), abs=0.08)
    big = attack.sample(x, ThreatModel("linf", 3.0, (0.0, 1.0)), 50, torch.Generator().manual_seed(0))
    assert float(big.min()) == 0.0 and float(big.max()) == 1.0
    assert not attack.eps_is_radius and make("lrc", project=True).eps_is_radius


def test_autoattack_missing_package_message(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    with pytest.raises(ImportError, match=r"pip install gradreg\[autoattack\]"):
        make("autoattack")


def test_attack_rejects_unsupported_norm(digits_cw, batch) -> None:  # type: ignore[no-untyped-def]
    x, y = batch
    with pytest.raises(ValueError, match="supports norms"):
        make("fgsm")(digits_cw, x, y, ThreatModel("l2", 0.1, (0.0, 1.0)))
    with pytest.raises(UnknownNameError, match="pgd"):
        make("pgdd")


# ---------------------------------------------------------------------------------------------
# the `gradreg attack` command
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_run(monkeypatch, digits_cw, digits):  # type: ignore[no-untyped-def]
    import gradreg.runs
    from gradreg import cli

    # import every command module first, so none binds the fake at import time (they may
    # `from ..runs import load_run`; ours looks it up at call time)
    cli.build_parser()

    loaded = SimpleNamespace(model=digits_cw, config={}, data=lambda **_: digits, device=torch.device("cpu"))
    monkeypatch.setattr(gradreg.runs, "load_run", lambda run_dir, device="auto": loaded)
    return loaded


def _args(*argv: str) -> argparse.Namespace:
    from gradreg.commands import attack as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_attack_command_json(fake_run, digits, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from gradreg.commands import attack as command

    out = tmp_path / "res.json"
    rc = command.run(_args("RUN", "--attack", "fgsm", "--norm", "linf", "--eps", "0", "8/255", "0.1",
                           "--limit", "80", "--json", str(out)))
    assert rc == 0
    table = capsys.readouterr().out
    assert "fgsm" in table and "clean accuracy" in table
    res = json.loads(out.read_text())
    assert set(res) == {"clean_accuracy", "clean", "n", "results", "record"}
    assert res["n"] == 80 and res["record"]["attack"]  # the attack's package and version are recorded
    x, y = digits.test_x[:80], digits.test_y[:80]
    assert res["clean_accuracy"] == pytest.approx(_acc(fake_run.model, x, y))
    assert [r["eps"] for r in res["results"]] == pytest.approx([0.0, 8 / 255, 0.1])
    assert {r["attack"] for r in res["results"]} == {"fgsm"} and {r["norm"] for r in res["results"]} == {"linf"}
    assert res["results"][0]["accuracy"] == res["clean_accuracy"]
    assert res["results"][2]["accuracy"] < res["clean_accuracy"]


@pytest.mark.parametrize("argv,message", [
    (["--attack", "pgd", "--eps", "-0.1"], "ε must be"),
    (["--attack", "nope", "--eps", "0.1"], "unknown attack"),
    (["--attack", "pgd", "--norm", "l7", "--eps", "0.1"], "unknown norm"),
    (["--attack", "fgsm", "--steps", "5", "--eps", "0.1"], "no parameter steps"),
    (["--attack", "fgsm", "--norm", "l2", "--eps", "0.1"], "supports norms"),
])
def test_attack_command_bad_input(argv, message, fake_run, capsys) -> None:  # type: ignore[no-untyped-def]
    from gradreg import cli

    assert cli.main(["attack", "RUN", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
