"""LRC-augmented training (``lrc-aug``): the loss on x + LRC noise, its noise model, rank
independence of its random numbers, and mode / BatchNorm hygiene."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradreg import models, penalties
from gradreg.objective import Objective
from gradreg.penalties import CleanPass, noise_aug  # noqa: F401  (registers "lrc-aug" until __init__ does)
from gradreg.penalties.base import BatchNoise

SHAPE = (1, 6, 6)


def batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, *SHAPE), generator=gen), torch.randint(0, 10, (n,), generator=gen)


def smooth_mlp() -> nn.Module:
    torch.manual_seed(0)
    return models.make("mlp", in_shape=SHAPE, hidden=(16,))


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))


def make_pen(**params: object) -> penalties.Penalty:
    pen = penalties.make("lrc-aug", **params)
    pen.setup(None, batch(64, seed=5)[0])
    return pen


def test_registered_as_augmentation() -> None:
    assert "lrc-aug" in penalties.PENALTIES
    pen = penalties.make("lrc-aug")
    assert (pen.task_weight, pen.default_lam) == (0.0, 1.0)  # the noisy loss replaces the clean one


def test_finite_and_gradients_reach_every_parameter() -> None:
    model = smooth_mlp().train()
    x, y = batch()
    value = make_pen()(model, x, y)
    assert value.dim() == 0 and torch.isfinite(value)
    grads = torch.autograd.grad(value, list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name


@pytest.mark.parametrize("training", [True, False])
def test_zero_eps_is_plain_cross_entropy_on_x(training: bool) -> None:
    model = smooth_mlp().train(training)
    x, y = batch()
    value = make_pen(eps=0.0)(model, x, y)
    torch.testing.assert_close(value, F.cross_entropy(model(x), y))


def test_value_is_the_loss_on_the_clipped_noisy_batch() -> None:
    model = smooth_mlp().eval()
    x, y = batch()
    pen = make_pen(eps=0.3, zetas=[2.0])
    torch.manual_seed(7)
    value = pen(model, x, y)
    torch.manual_seed(7)
    noisy = (x + pen.noise(x)).clamp(0, 1)
    torch.testing.assert_close(value, F.cross_entropy(model(noisy), y))
    assert float(noisy.min()) == 0.0 and float(noisy.max()) == 1.0  # ε = 0.3 noise is clipped


def test_noise_has_the_lrc_covariance_scaled_by_eps_and_data_std() -> None:
    train_x = batch(500, seed=2)[0]
    pen = penalties.make("lrc-aug", eps=0.5, zetas=[2.0], scale="data")
    pen.setup(None, train_x)
    sigma = math.sqrt(float(train_x.flatten(1).var(dim=0).mean()))
    assert float(pen.marginal_std) == pytest.approx(sigma, rel=1e-6)
    torch.manual_seed(0)
    xi = pen.noise(torch.zeros(20000, *SHAPE)).reshape(20000, 36) / (0.5 * sigma)
    assert float(xi.var(dim=0).mean()) == pytest.approx(1.0, abs=0.05)
    assert float((xi[:, 0] * xi[:, 1]).mean()) == pytest.approx(math.exp(-1 / 2.0), abs=0.05)  # 1 px apart


def test_decay_length_is_drawn_per_example_from_the_set() -> None:
    pen = make_pen(eps=1.0, zetas=[1.0, 16.0], scale="unit")
    torch.manual_seed(0)
    xi = pen.noise(torch.zeros(20000, *SHAPE)).reshape(20000, 36)
    neighbours = xi[:, 0] * xi[:, 1]  # (N,) products of horizontal neighbours
    # a half-half mixture of the two decay lengths
    assert float(neighbours.mean()) == pytest.approx((math.exp(-1) + math.exp(-1 / 16)) / 2, abs=0.03)


def test_random_numbers_do_not_depend_on_the_split_over_ranks() -> None:
    model = smooth_mlp().eval()
    x, y = batch(8)
    pen = make_pen()

    def ctx(rows: torch.Tensor) -> CleanPass:
        return CleanPass(model, x[rows], y[rows], noise=BatchNoise(11, rows, global_size=8))

    whole = torch.arange(8)
    halves = [torch.arange(0, 3), torch.arange(3, 8)]  # an uneven 2-rank split
    one_rank = pen.noise(x, ctx(whole))
    two_ranks = torch.cat([pen.noise(x[r], ctx(r)) for r in halves])
    torch.testing.assert_close(two_ranks, one_rank)
    value = pen(model, x, y, ctx=ctx(whole))
    shares = sum(len(r) / 8 * pen(model, x[r], y[r], ctx=ctx(r)) for r in halves)
    torch.testing.assert_close(shares, value)
    # another step (seed) draws other noise
    other = pen.noise(x, CleanPass(model, x, y, noise=BatchNoise(12, whole, global_size=8)))
    assert not torch.allclose(other, one_rank)


@pytest.mark.parametrize("training", [True, False])
def test_modes_restored_and_running_stats_untouched(training: bool) -> None:
    model = bn_net().train(training)
    model[5].train(not training)  # a mixed-mode model: every submodule's own mode must come back
    modes = [m.training for m in model.modules()]
    x, y = batch(8)
    ctx = CleanPass(model, x, y)  # the loop's clean pass (it may update BN statistics)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    value = make_pen()(model, x, y, ctx=ctx)
    (value + ctx.losses()[0]).backward()
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k


def test_objective_trains_on_noisy_inputs_only() -> None:
    model = smooth_mlp().eval()
    x, y = batch()
    pen = make_pen()
    torch.manual_seed(3)
    out = Objective([("lrc-aug", pen, pen.default_lam)], task_weight=pen.task_weight)(model, x, y)
    torch.manual_seed(3)
    torch.testing.assert_close(out.loss, pen(model, x, y))


def test_data_scale_needs_setup_and_parameters_are_checked() -> None:
    x, y = batch()
    with pytest.raises(RuntimeError, match="setup"):
        penalties.make("lrc-aug")(smooth_mlp(), x, y)
    assert float(penalties.make("lrc-aug", scale="unit").marginal_std) == 1.0
    assert float(penalties.make("lrc-aug", scale=0.2).marginal_std) == pytest.approx(0.2)
    for bad, match in (({"eps": -0.1}, "eps"), ({"zetas": []}, "zetas"), ({"zetas": [0.0]}, "zetas"),
                       ({"scale": "pixel"}, "scale"), ({"perturbed_bn_policy": "batch"}, "BatchNorm policy")):
        with pytest.raises(ValueError, match=match):
            penalties.make("lrc-aug", **bad)
