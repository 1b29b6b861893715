"""Per-example gradient norms and the data-dependent operator norm, against independent
computations: autograd one example at a time, a full SVD of an explicit Jacobian, and a brute
force over the vertices of the ℓ∞ ball."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from gradreg import models
from gradreg.analysis import input_gradient_norms, norm_stats, norms_markdown, plot_norm_distributions


def _tiny(seed: int = 0, in_shape: tuple[int, int, int] = (1, 3, 3), classes: int = 4) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = models.make("mlp", in_shape=in_shape, num_classes=classes, hidden=(16,), mean=[0.5], std=[0.3]).double().eval()
    x = torch.rand(7, *in_shape, dtype=torch.float64)
    y = torch.randint(0, classes, (7,))
    return model, x, y


def _jacobian(model: torch.nn.Module, xi: torch.Tensor) -> np.ndarray:
    jac = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], xi)  # (K, C, H, W)
    return jac.reshape(jac.shape[0], -1).numpy()


def test_gradient_norms_match_autograd_per_example() -> None:
    model, x, y = _tiny()
    got = input_gradient_norms(model, x, y, iterations=2, batch_size=3)
    for i in range(len(y)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)
        assert torch.allclose(got["grad_l1"][i], g.abs().sum(), rtol=1e-9)
        assert torch.allclose(got["grad_l2"][i], g.norm(), rtol=1e-9)


def test_operator_norm_matches_the_largest_singular_value() -> None:
    model, x, y = _tiny(seed=1)
    got = input_gradient_norms(model, x, y, iterations=200, batch_size=4)["opnorm_l2_l2"]
    want = [np.linalg.svd(_jacobian(model, x[i]), compute_uv=False)[0] for i in range(len(y))]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_linf_to_l2_operator_norm_reaches_the_best_vertex() -> None:
    # ‖J‖_{∞,2} = max over v ∈ {±1}^d of ‖Jv‖₂ (a convex function peaks at a vertex): brute force, d = 6
    model, x, y = _tiny(seed=2, in_shape=(1, 2, 3))
    got = input_gradient_norms(model, x, y, opnorm_p="linf", opnorm_q="l2", iterations=50)["opnorm_linf_l2"]
    vertices = np.array(list(itertools.product((-1.0, 1.0), repeat=6)))  # (64, 6)
    values = np.stack([np.linalg.norm(_jacobian(model, x[i]) @ vertices.T, axis=0) for i in range(len(y))])  # (N, 64)
    # the power method ends at a vertex: its value is one of the vertices' values, never above the best
    # (for p ≠ 2 it is a local maximum, a lower bound: documented)
    assert (np.abs(values - got.numpy()[:, None]).min(axis=1) < 1e-9).all()
    assert (got.numpy() <= values.max(axis=1) + 1e-9).all()
    assert (got.numpy() >= 0.8 * values.max(axis=1)).all(), (got, values.max(axis=1))


def test_stats_table_and_plot(tmp_path: Path) -> None:
    v = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    (s,) = norm_stats({"grad_l2": v})
    q = np.quantile(v.numpy(), [0.25, 0.5, 0.75])
    assert (s.q1, s.median, s.q3, s.n) == (q[0], q[1], q[2], 5)
    per_method = {"clean": {"grad_l2": v, "grad_l1": v * 3}, "gn": {"grad_l2": v / 10, "grad_l1": torch.zeros(5)}}
    table = norms_markdown(per_method)
    assert "| gn | grad_l2 | 0.3 | 0.2 | 0.4 | 5 |" in table
    plot_norm_distributions(per_method, str(tmp_path / "norms.png"), title="t")
    assert (tmp_path / "norms.png").stat().st_size > 0


def test_analyze_cli_writes_the_norms(tmp_path: Path) -> None:
    import json

    from gradreg.cli import main
    from gradreg.config import TrainConfig
    from gradreg.trainer import train

    train(TrainConfig(data="digits", model="mlp", epochs=1, quiet=True, out=str(tmp_path / "run")), log=lambda s: None)
    assert main(["analyze", str(tmp_path / "run"), "--out", str(tmp_path / "an"), "--n-test", "20", "--steps", "2",
                 "--norms", "--opnorm-p", "linf", "--opnorm-q", "l2"]) == 0
    result = json.loads((tmp_path / "an" / "results.json").read_text())
    assert [s["quantity"] for s in result["norms"]] == ["grad_l1", "grad_l2", "opnorm_linf_l2"]
    assert all(s["n"] == 20 and 0 < s["q1"] <= s["median"] <= s["q3"] for s in result["norms"])
    assert (tmp_path / "an" / "norms.png").is_file() and "opnorm_linf_l2" in (tmp_path / "an" / "report.md").read_text()
