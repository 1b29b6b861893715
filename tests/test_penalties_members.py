"""The single-step, alignment, curvature, linearity and Jacobian members: each value against an
independent float64 computation of its paper's formula with the same random draws (the batch
noise generator fixes them), their defining properties, rank independence, bitwise resume and
training from the API and the CLI. The registry's table (tests/test_penalties_registry.py)
covers them too: fast paths = plain composition, modes and BatchNorm statistics, state dicts."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import gradreg
from gradreg import models, penalties
from gradreg.cleanpass import Ranks
from gradreg.config import TrainConfig
from gradreg.objective import Objective
from gradreg.penalties import CleanPass
from gradreg.penalties.base import BatchNoise
from gradreg.penalties.gradalign import paper_align_lam
from gradreg.trainer import train as trainer_train

MEMBERS = ["fgsm-rs", "n-fgsm", "gradalign", "cure", "llr", "elle", "elle-a", "jacreg"]
SHAPE = (1, 4, 4)
CLASSES = 5
SEED = 7
EPS = 0.05


def smooth_mlp() -> nn.Module:
    """A float64 MLP with softplus (nonzero second derivatives), mode-invariant."""
    torch.manual_seed(0)
    model = models.make("mlp", in_shape=SHAPE, num_classes=CLASSES, hidden=(12,))
    for i, m in enumerate(model.features):
        if isinstance(m, nn.ReLU):
            model.features[i] = nn.Softplus()
    return model.double().eval()


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    # interior pixels: ε-steps never reach the box, so clipping does not hide a missing projection
    return 0.3 + 0.4 * torch.rand((n, *SHAPE), generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (n,), generator=g)


def noise(n: int) -> BatchNoise:
    return BatchNoise(SEED, torch.arange(n), n)


def value(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **params: object) -> float:
    pen = penalties.make(name, **params)
    pen.setup(model, x)
    ctx = CleanPass(model, x, y, need_input_grad=True, noise=noise(len(x)))
    return float(pen(model, x, y, ctx=ctx).detach())


# --- independent references: per-sample loops, float64, the draws replayed from the same noise ---

def loss_i(model: nn.Module, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(xi[None]), yi[None])


def grad_i(model: nn.Module, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
    xi = xi.clone().requires_grad_(True)
    return torch.autograd.grad(loss_i(model, xi, yi), xi)[0]


def grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([grad_i(model, x[i], y[i]) for i in range(len(x))])


def losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([loss_i(model, x[i], y[i]) for i in range(len(x))])


def draws(n: int, *shapes: tuple[int, ...], fns: tuple = ()) -> list[torch.Tensor]:
    gen = noise(n)
    fns = fns or (torch.rand,) * len(shapes)
    return [gen(fn, shape).double() for fn, shape in zip(fns, shapes)]


def test_fgsm_rs_is_wong_et_al() -> None:
    model, (x, y) = smooth_mlp(), batch()
    (u,) = draws(len(x), tuple(x.shape))
    x0 = (x + (2 * u - 1) * EPS).clamp(0, 1)
    step = x0 + 1.25 * EPS * grads(model, x0, y).sign()
    x_adv = (x + (step - x).clamp(-EPS, EPS)).clamp(0, 1)  # projected onto the ball, then the box
    want = losses(model, x_adv, y).mean()
    assert value("fgsm-rs", model, x, y, eps=EPS) == pytest.approx(float(want), rel=1e-12)


def test_n_fgsm_is_de_jorge_et_al_and_leaves_the_ball() -> None:
    model, (x, y) = smooth_mlp(), batch()
    (u,) = draws(len(x), tuple(x.shape))
    x0 = (x + (2 * u - 1) * 2 * EPS).clamp(0, 1)
    x_adv = (x0 + EPS * grads(model, x0, y).sign()).clamp(0, 1)
    want = losses(model, x_adv, y).mean()
    assert value("n-fgsm", model, x, y, eps=EPS) == pytest.approx(float(want), rel=1e-12)
    pen = penalties.make("n-fgsm", eps=EPS)
    pen.setup(model, x)
    got = pen.attack(model, x, y, CleanPass(model, x, y, noise=noise(len(x))))
    dist = (got - x).abs()
    assert float(dist.max()) > EPS * 1.5  # no projection: many pixels beyond ε
    assert float(dist.max()) <= 3 * EPS + 1e-12  # ‖δ‖∞ ≤ (k + 1)·ε
    assert torch.equal(got, x_adv)


def test_gradalign_is_fgsm_plus_alignment() -> None:
    model, (x, y) = smooth_mlp(), batch()
    (u,) = draws(len(x), tuple(x.shape))
    g1 = grads(model, x, y)
    g2 = grads(model, (x + (2 * u - 1) * EPS).clamp(0, 1), y)
    cos = F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1)
    fgsm = (x + EPS * g1.sign()).clamp(0, 1)
    want = losses(model, fgsm, y).mean() + 0.7 * (1 - cos.mean())
    assert value("gradalign", model, x, y, eps=EPS, align_lam=0.7) == pytest.approx(float(want), rel=1e-10)


def test_gradalign_lambda_follows_the_authors_scheme() -> None:
    """0.2 at 8/255 and 2.0 at 16/255 (SPEC §7); the script's 0.027 at 1/255 and 0.474 at 11/255."""
    box = (0.0, 1.0)
    assert paper_align_lam(8 / 255, box) == pytest.approx(0.2, rel=1e-12)
    assert paper_align_lam(16 / 255, box) == pytest.approx(2.0, rel=1e-12)
    assert paper_align_lam(1 / 255, box) == pytest.approx(0.027, abs=5e-4)
    assert paper_align_lam(11 / 255, box) == pytest.approx(0.474, abs=5e-4)
    assert paper_align_lam(0.3, box) == 2.0  # capped beyond the tuned range
    assert paper_align_lam(16 / 255 * 2, (-1.0, 1.0)) == pytest.approx(2.0, rel=1e-12)  # ε relative to the box


def test_cure_is_the_curvature_finite_difference() -> None:
    model, (x, y) = smooth_mlp(), batch()
    h = 0.5
    g = grads(model, x, y)
    z = g.sign() / math.sqrt(g[0].numel())  # every component is nonzero here
    want = (grads(model, x + h * z, y) - g).flatten(1).pow(2).sum(dim=1).mean()
    assert value("cure", model, x, y, h=h) == pytest.approx(float(want), rel=1e-10)


def test_cure_ramps_h_per_training_step() -> None:
    pen = penalties.make("cure", h=2.0, h_ramp_steps=4)
    model, (x, y) = smooth_mlp().train(), batch()
    seen = []
    for _ in range(6):
        seen.append(pen.current_h())
        pen(model, x, y)
    assert seen == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    model.eval()
    pen(model, x, y)
    assert int(pen.step) == 6  # evaluation does not advance the schedule


def test_llr_is_qin_et_al() -> None:
    model, (x, y) = smooth_mlp(), batch()
    steps, lam, mu = 2, 4.0, 3.0
    (u,) = draws(len(x), tuple(x.shape))
    l0, g0 = losses(model, x, y), grads(model, x, y)

    def gap(xa: torch.Tensor) -> torch.Tensor:  # (N,) |ℓ(x+δ) − ℓ(x) − δᵀg|, differentiable in xa
        ce = torch.stack([loss_i(model, xa[i], y[i]) for i in range(len(xa))])
        return (ce - l0 - ((xa - x) * g0).flatten(1).sum(dim=1)).abs()

    xa = (x + (2 * u - 1) * EPS).clamp(0, 1)
    for _ in range(steps):
        xr = xa.clone().requires_grad_(True)
        d = torch.autograd.grad(gap(xr).sum(), xr)[0]
        xa = (x + (xa + 0.25 * EPS * d.sign() - x).clamp(-EPS, EPS)).clamp(0, 1)
    delta = xa - x
    with torch.no_grad():
        want = (lam * gap(xa) + mu * (delta * g0).flatten(1).sum(dim=1).abs()).mean()
    assert value("llr", model, x, y, eps=EPS, steps=steps) == pytest.approx(float(want), rel=1e-10)


def test_elle_is_the_interpolation_error() -> None:
    model, (x, y) = smooth_mlp(), batch()
    ua, ub, alpha = draws(len(x), tuple(x.shape), tuple(x.shape), (len(x),))
    xa, xb = (x + (2 * ua - 1) * EPS).clamp(0, 1), (x + (2 * ub - 1) * EPS).clamp(0, 1)
    a = alpha.view(-1, 1, 1, 1)
    xc = a * xa + (1 - a) * xb
    want = (losses(model, xc, y) - alpha * losses(model, xa, y) - (1 - alpha) * losses(model, xb, y)).pow(2).mean()
    assert value("elle", model, x, y, eps=EPS) == pytest.approx(float(want), rel=1e-10)
    assert float(want) > 0


def test_elle_a_rule_against_a_list_of_past_errors() -> None:
    """λ jumps to lam_max when E > mean + 2·std of all earlier E (sample std), else ×decay."""
    pen = penalties.make("elle-a", lam_max=10.0, decay=0.5)
    errors = [1.0, 1.1, 0.9, 1.0, 5.0, 1.0, 1.05, 0.95, 9.0, 1.0]
    lam, past, got, want = 10.0, [], [], []
    for e in errors:
        if len(past) >= 2:
            mean = sum(past) / len(past)
            std = math.sqrt(sum((p - mean) ** 2 for p in past) / (len(past) - 1))
            lam = 10.0 if e > mean + 2 * std else lam * 0.5
        else:
            lam *= 0.5
        past.append(e)
        want.append(lam)
        got.append(pen.update(e))
    assert got == pytest.approx(want, rel=1e-12)
    assert got[4] == 10.0 and got[8] == 10.0 and got[3] < 10.0


def test_elle_a_value_is_lambda_times_elle_and_resumes_from_its_buffers() -> None:
    model, (x, y) = smooth_mlp().train(), batch()
    pen = penalties.make("elle-a", eps=EPS)
    for _ in range(3):
        pen(model, x, y)
    clone = penalties.make("elle-a", eps=EPS)
    clone.load_state_dict(pen.state_dict())
    assert int(clone.count) == 3
    ctx = lambda: CleanPass(model, x, y, noise=noise(len(x)))  # noqa: E731
    elle = float(penalties.make("elle", eps=EPS)(model, x, y, ctx=ctx()))
    a, b = float(pen(model, x, y, ctx=ctx())), float(clone(model, x, y, ctx=ctx()))
    assert a == b == pytest.approx(float(pen.lam_now) * elle, rel=1e-12)


class OtherRank(Ranks):
    """A group of two ranks, seen from one: the other holds ``rows`` examples whose mean ELLE
    error is ``err`` (each step), and averages weight by shard size."""

    def __init__(self, err: float, rows: int) -> None:
        self.err, self.rows = err, rows
        self.counts: list[int] = []  # the row counts this rank reported

    def average(self, estimates: list[torch.Tensor], count: int) -> list[torch.Tensor]:
        self.counts.append(count)
        return [(e * count + self.err * self.rows) / (count + self.rows) for e in estimates]


def test_elle_a_decides_on_the_group_mean_error_through_ctx_ranks() -> None:
    """The rule reads the global batch's mean E from ``ctx.ranks``, not this rank's own E: an
    outlier on the other rank makes every rank jump to lam_max."""
    model, (x, y) = smooth_mlp().train(), batch()
    ctx = lambda: CleanPass(model, x, y, noise=noise(len(x)))  # noqa: E731
    local = float(penalties.make("elle", eps=EPS)(model, x, y, ctx=ctx()).detach())  # this rank's E, every step
    pen = penalties.make("elle-a", eps=EPS, lam_max=10.0, decay=0.5)
    group = OtherRank(err=3 * local, rows=2)
    steps = 3
    for _ in range(steps):  # the other rank's error is normal (constant) here
        c = ctx()
        c.ranks = group
        pen(model, x, y, ctx=c)
    assert group.counts == [len(x)] * steps
    want = (local * len(x) + 3 * local * 2) / (len(x) + 2)  # by hand: the shard-weighted mean
    assert float(pen.err_mean) == pytest.approx(want, rel=1e-9)
    assert float(pen.lam_now) == pytest.approx(10.0 * 0.5**steps, rel=1e-12)
    group.err = 1000 * local  # an outlier on the other rank only: this rank's E is unchanged
    c = ctx()
    c.ranks = group
    pen(model, x, y, ctx=c)
    assert float(pen.lam_now) == 10.0


def test_elle_a_reads_the_monitor_only_when_asked() -> None:
    """By default λ_t follows ELLE's own error alone (the paper's rule); with monitor_jump a
    flagged check raises λ_t to lam_max, and an unflagged one changes nothing."""
    plain = penalties.make("elle-a", eps=EPS, lam_max=50.0)
    plain.lam_now.fill_(3.0)
    plain.on_monitor(fgsm_accuracy=0.9, pgd_accuracy=0.0, overfit=True, step=10)
    assert float(plain.lam_now) == 3.0
    asked = penalties.make("elle-a", eps=EPS, lam_max=50.0, monitor_jump=True)
    asked.lam_now.fill_(3.0)
    asked.on_monitor(fgsm_accuracy=0.9, pgd_accuracy=0.5, overfit=False, step=10)
    assert float(asked.lam_now) == 3.0
    asked.on_monitor(fgsm_accuracy=0.9, pgd_accuracy=0.0, overfit=True, step=20)
    assert float(asked.lam_now) == 50.0
    assert asked.update(0.0) == pytest.approx(50.0 * asked.decay)  # then decays as after a jump of E


def test_jacreg_with_k_equal_classes_is_the_exact_frobenius_norm() -> None:
    model, (x, y) = smooth_mlp(), batch()
    jac = torch.func.vmap(torch.func.jacrev(lambda xi: model(xi[None])[0]))(x)  # (N, C, 1, 4, 4)
    want = jac.pow(2).flatten(1).sum(dim=1).mean()
    assert value("jacreg", model, x, y, projections=CLASSES) == pytest.approx(float(want), rel=1e-12)


def test_jacreg_random_projections_are_unbiased() -> None:
    model = smooth_mlp()
    x1, _ = batch(1)
    n = 4000  # one input, n independent projections (one per row)
    x, y = x1.expand(n, *SHAPE).contiguous(), torch.zeros(n, dtype=torch.long)
    exact = torch.func.jacrev(lambda xi: model(xi[None])[0])(x1[0]).pow(2).sum()
    pen = penalties.make("jacreg", projections=1)
    ctx = CleanPass(model, x, y, need_input_grad=True, noise=noise(n))
    from gradreg.penalties.jacreg import frobenius_sq

    graph = ctx.graph_in(model, "frozen" if model.training else "eval")
    assert graph is not None
    per_row = frobenius_sq(ctx, graph, 1).detach()  # (n,)
    se = float(per_row.std()) / math.sqrt(n)
    assert abs(float(per_row.mean()) - float(exact)) < 4 * se
    assert float(per_row.std()) > 0.05 * float(exact)  # really random, not the exact value
    assert float(pen(model, x[:8], y[:8])) > 0


@pytest.mark.parametrize("name", MEMBERS)
def test_two_rank_split_gives_the_whole_batch(name: str) -> None:
    """Each rank draws its rows of the global batch's noise: the mean of the two halves' values
    and parameter gradients equals the whole batch's (what DDP averages)."""
    model, (x, y) = smooth_mlp().train(), batch(8)
    params = {"eps": EPS} if name not in ("cure", "jacreg") else {}

    def run(rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pen = penalties.make(name, **params)
        pen.setup(model, x)
        out = Objective([(name, pen, 1.0)], task_weight=pen.task_weight)(
            model, x[rows], y[rows], index=rows, noise=BatchNoise(SEED, rows, len(x)))
        return out.loss.detach(), list(torch.autograd.grad(out.loss, list(model.parameters())))

    whole, g_whole = run(torch.arange(8))
    halves = [run(torch.arange(8)[r::2]) for r in range(2)]
    assert float(whole) == pytest.approx(float(halves[0][0] + halves[1][0]) / 2, rel=1e-10)
    for i, g in enumerate(g_whole):
        torch.testing.assert_close(g, (halves[0][1][i] + halves[1][1][i]) / 2, rtol=1e-9, atol=1e-12)


def _cfg(tmp_path: Path, name: str, method: str, **kw: object) -> TrainConfig:
    penalty = {"steps": 1} if method == "llr" else {}
    base = dict(data="digits", model="cw", epochs=2, batch_size=256, seed=1, quiet=True, method=method,
                penalty=penalty, out=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("method", MEMBERS)
def test_trains_from_the_api_and_resumes_bitwise(tmp_path: Path, method: str) -> None:
    run = gradreg.train(_cfg(tmp_path, "full", method), log=lambda s: None)
    assert math.isfinite(run.metrics["test_accuracy"])
    assert trainer_train(_cfg(tmp_path, "part", method), stop_after_epoch=1, log=lambda s: None) == {
        "stopped_after_epoch": 1}
    gradreg.train(_cfg(tmp_path, "part", method), resume=True, log=lambda s: None)
    full, part = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("full", "part"))
    assert all(torch.equal(full[k], part[k]) for k in full)


@pytest.mark.parametrize("method,add", [("fgsm-rs", "elle-a"), ("n-fgsm", "jacreg:lam=0.01"), ("gradalign", "cure:lam=1"),
                                        ("llr", "igr:lam=0.1")])
def test_trains_from_the_cli_composed_with_add(tmp_path: Path, method: str, add: str) -> None:
    from gradreg.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--data", "digits", "--model", "mlp", "--set", "model_params.hidden=[16]", "--epochs", "1",
               "--batch-size", "512", "--method", method, "--add", add, "--set", "penalty.eps=0.05", "--quiet",
               "--out", str(out)])
    assert rc == 0 and (out / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    # ELLE-A's rule reads the ranks' mean error (all-reduced); N-FGSM's noise is drawn per global batch
    ("elle-a", ["--set", "penalty.eps=0.1"]),
    ("n-fgsm", ["--set", "penalty.eps=0.1"]),
])
def test_two_ranks_under_torchrun_match_one(tmp_path: Path, method: str, extra: list[str]) -> None:
    from test_distributed import COMMON, _compare, _run

    args = [*COMMON, "--method", method, *extra]
    _run([*args, "--out", str(tmp_path / "one")], 1)
    _run([*args, "--out", str(tmp_path / "two")], 2)
    # Float32 sums reordered by the split: N-FGSM's sign step can flip on a near-zero gradient
    # component; ELLE-A multiplies E's rounding by λ ≈ 5000 (the in-process split test above checks
    # both exactly in float64). A rank-local λ rule or noise would differ by orders of magnitude more.
    _compare(tmp_path / "one", tmp_path / "two", atol=2e-3 if method == "n-fgsm" else 2e-4)


def bn_cnn() -> nn.Module:
    """A float64 conv net with BatchNorm: its train and eval modes compute different functions."""
    from gradreg.models.base import Classifier

    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Softplus(), nn.Flatten())
    return Classifier(features, 3 * 16, in_shape=SHAPE, num_classes=CLASSES).double().train()


@pytest.mark.parametrize("name", MEMBERS)
def test_fast_paths_give_the_plain_composition_on_a_batchnorm_model(name: str) -> None:
    """With BatchNorm in train mode the reuse rule decides which passes the shared clean pass may
    stand in for (train-mode passes yes, eval-mode attacks no): same value and gradient as the
    plain composition, and the running statistics move exactly as the plain step moves them."""
    x, y = batch(8)
    params = {"eps": EPS} if name not in ("cure", "jacreg") else {}
    results = []
    for fast in (False, True):
        model = bn_cnn()
        pen = penalties.make(name, **params)
        pen.setup(model, x)
        out = Objective([(name, pen, 1.0)], task_weight=pen.task_weight, fast_paths=fast)(
            model, x, y, index=torch.arange(8), noise=BatchNoise(SEED, torch.arange(8), 8))
        grads_ = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
        bn = model.features[1]
        results.append((out.loss.detach(), grads_, bn.running_mean.clone(), bn.running_var.clone()))
    (l0, g0, m0, v0), (l1, g1, m1, v1) = results
    assert float(l1) == pytest.approx(float(l0), rel=1e-10)
    for a, b in zip(g0, g1):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-11)
    assert torch.equal(m0, m1) and torch.equal(v0, v1)


def test_list_methods_shows_every_member_with_its_paper(capsys: pytest.CaptureFixture[str]) -> None:
    from gradreg.cli import main

    assert main(["list", "methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    papers = {"fgsm-rs": "Wong", "n-fgsm": "de Jorge", "gradalign": "Andriushchenko", "cure": "Moosavi-Dezfooli",
              "llr": "Qin", "elle": "Abad Rocamora", "elle-a": "Abad Rocamora", "jacreg": "Hoffman",
              "igr": "Ross & Doshi-Velez"}
    for name, author in papers.items():
        assert author in lines[name], lines.get(name)
    assert "alias of gn" in lines["igr"]
    assert penalties.PENALTIES.get("igr") is penalties.PENALTIES.get("gn")
