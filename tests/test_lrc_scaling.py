"""The LRC attack's data-covariance options (marginal_std, a covariance factor) and the
helpers behind them, checked against numpy and explicit covariance estimates."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradreg import ThreatModel
from gradreg.attacks import make
from gradreg.attacks.lrc import (
    covariance_factor,
    data_covariance,
    lrc_noise,
    lrc_transform,
    mean_marginal_variance,
)
from gradreg.protocols import (
    EvalSettings,
    lrc_covariance_curve,
    lrc_curves,
    lrc_data_factor,
    lrc_data_std,
)


def test_lrc_transform_is_lrc_noise_with_given_random_numbers() -> None:
    shape = (3, 5, 4)
    ref = lrc_noise(7, shape, zeta_px=2.0, generator=torch.Generator().manual_seed(3))
    z = torch.randn((7, *shape), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(lrc_transform(z, zeta_px=2.0), ref)


def test_data_covariance_and_marginal_variance_match_numpy(digits) -> None:  # type: ignore[no-untyped-def]
    x = digits.train_x
    ref = np.cov(x.reshape(len(x), -1).double().numpy(), rowvar=False)
    cov = data_covariance(x, chunk=300)  # several chunks
    np.testing.assert_allclose(cov.numpy(), ref, atol=1e-10)
    assert mean_marginal_variance(x, chunk=300) == pytest.approx(float(np.diag(ref).mean()), rel=1e-10)
    assert lrc_data_std(digits) == pytest.approx(math.sqrt(float(np.diag(ref).mean())), rel=1e-10)


def test_covariance_factor_of_a_singular_data_covariance(digits) -> None:  # type: ignore[no-untyped-def]
    cov = data_covariance(digits.train_x)
    assert float(cov.diagonal().min()) == 0.0  # digits has constant pixels: Cholesky would fail
    f = covariance_factor(cov)
    assert torch.isfinite(f).all()
    torch.testing.assert_close(f @ f.T, cov, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="square"):
        covariance_factor(torch.zeros(3, 4))


def test_marginal_std_scales_the_noise() -> None:
    x = torch.full((1, 1, 6, 6), 0.5)
    small = ThreatModel("linf", 0.01, (0.0, 1.0))  # no clipping at this strength
    copies = make("lrc", zeta_px=2.0, marginal_std=0.25).sample(x, small, 4000, torch.Generator().manual_seed(0))
    xi = ((copies - x) / 0.01).reshape(4000, 36)
    assert float(xi.var(dim=0).mean()) == pytest.approx(0.25**2, rel=0.08)
    with pytest.raises(ValueError, match="marginal_std"):
        make("lrc", marginal_std=-1.0)


def test_factor_replaces_sigma_lrc() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    cov = a @ a.T / 16  # an arbitrary covariance of 1×4×4 inputs
    attack = make("lrc", factor=covariance_factor(cov), zeta_px=1.0)
    x = torch.full((1, 1, 4, 4), 0.5, dtype=torch.float64)
    small = ThreatModel("linf", 0.001, (0.0, 1.0))
    copies = attack.sample(x, small, 20000, torch.Generator().manual_seed(1))
    xi = ((copies - x) / 0.001).reshape(20000, 16)
    emp = xi.T @ xi / 20000
    assert float((emp - cov).abs().max()) < 0.08 * float(cov.diagonal().max())
    with pytest.raises(ValueError, match="coordinates"):
        attack.sample(torch.zeros(1, 1, 3, 3, dtype=torch.float64), small, 2, torch.Generator())
    assert "factor=(16, 16)" in repr(attack)  # the matrix itself is not printed


def test_protocol_lrc_columns_at_zero_strength_are_clean(digits_cw, digits) -> None:  # type: ignore[no-untyped-def]
    settings = EvalSettings(n_test=60)
    factor = lrc_data_factor(digits)
    curve = lrc_covariance_curve(digits_cw, digits, factor=factor, eps=[0.0, 0.3, 1.0], samples=5, settings=settings)
    by_zeta = lrc_curves(digits_cw, digits, zetas=[2.0], eps=[0.0, 0.3], samples=5, settings=settings,
                         marginal_std=lrc_data_std(digits))
    x, y = digits.test_x[:60], digits.test_y[:60]
    clean = float((digits_cw(x).argmax(1) == y).double().mean())
    assert curve[0] == pytest.approx(clean) and by_zeta[2.0][0] == pytest.approx(clean)
    assert curve[2] < curve[0]  # strong data-shaped noise hurts
