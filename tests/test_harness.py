"""Evaluation harness: masking checks, transfer matrix, decay length, CLI reports."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradreg import ThreatModel
from gradreg.analysis import decay_length, softmax_along_line
from gradreg.cli import main
from gradreg.config import TrainConfig
from gradreg.evaluate import evaluate_attack
from gradreg.harness import EvalSettings, default_grid, evaluate_model, transfer_matrix
from gradreg.train import train


class Rounded(nn.Module):
    """A planted gradient-masking model: the input is quantized before the network, so the
    input gradient is zero everywhere and gradient attacks cannot move."""

    def __init__(self, inner: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * self.levels) / self.levels)


SETTINGS = EvalSettings(attacks=("fgsm", "pgd", "uniform"), pgd_steps=10, n_test=120, deepfool=False)


def test_default_grids_follow_the_sgr_paper() -> None:
    assert default_grid("digits")[-1] == pytest.approx(32 / 255) and default_grid("digits")[0] == 0
    assert default_grid("cifar10")[-1] == pytest.approx(8 / 255) and len(default_grid("cifar10")) == 9


def test_masking_checks_quiet_on_a_normal_model(digits_cw: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    ev = evaluate_model(digits_cw, digits, SETTINGS, name="cw")
    assert ev.unbounded is not None and ev.unbounded <= 0.02
    assert all(c.passed for c in ev.checks), [c for c in ev.checks if not c.passed]
    assert ev.curves["pgd"][0] == pytest.approx(ev.clean)  # ε = 0 is clean accuracy
    assert ev.curves["pgd"][-1] < ev.clean


def test_masking_checks_fire_on_a_rounding_model(digits_cw: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    masked = Rounded(digits_cw).eval()
    ev = evaluate_model(masked, digits, SETTINGS, name="rounded")
    failed = {c.name for c in ev.checks if not c.passed}
    assert "unbounded PGD reaches 0%" in failed


def test_transfer_diagonal_equals_white_box(digits_cw: nn.Module, digits_mlp: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    settings = EvalSettings(pgd_steps=5, n_test=80, eps=[0.0, 0.05, 0.1])
    matrix = transfer_matrix({"cw": digits_cw, "mlp": digits_mlp}, digits, settings)
    x, y = digits.test_x[:80], digits.test_y[:80]
    # the same examples crafted and judged through evaluate_attack's own transfer path
    white = evaluate_attack(digits_mlp, x, y, settings.make_attack("pgd"), ThreatModel("linf", 0, (0, 1)),
                            settings.eps, batch_size=settings.batch_size, source_model=digits_mlp).robust_accuracy
    assert matrix["mlp"]["mlp"] == pytest.approx(white)
    # transferred examples are weaker than white-box ones on the same target
    assert sum(matrix["cw"]["mlp"]) >= sum(matrix["mlp"]["mlp"]) - 0.05


def test_decay_length_of_an_exponential() -> None:
    zeta = 3.0
    values = [math.exp(-r / zeta) for r in range(12)]
    assert decay_length(values) == pytest.approx(zeta, abs=0.05)
    assert decay_length([1.0, 0.9, 0.8]) is None


def test_softmax_line_ends_at_the_two_points(digits_cw: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    x = digits.test_x[:3]
    x_adv = (x + 0.1).clamp(0, 1)
    probs = softmax_along_line(digits_cw, x, x_adv, points=5)
    assert probs.shape == (5, 3, 10)
    assert torch.allclose(probs[0], torch.softmax(digits_cw(x), 1), atol=1e-6)
    assert torch.allclose(probs[-1], torch.softmax(digits_cw(x_adv), 1), atol=1e-6)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    out = []
    for name, method, lam in (("clean", "clean", None), ("gn", "gn", 1.0)):
        cfg = TrainConfig(data="digits", model="cw", epochs=6, batch_size=64, method=method, lam=lam, quiet=True,
                          out=str(root / name))
        train(cfg, log=lambda s: None)
        out.append(root / name)
    return out


def test_eval_transfer_lrc_analyze_commands_write_reports(two_runs: list[Path], tmp_path: Path) -> None:
    runs = [str(p) for p in two_runs]
    common = ["--n-test", "60", "--steps", "5"]
    assert main(["eval", *runs, "--out", str(tmp_path / "ev"), *common, "--eps", "0", "8/255", "16/255"]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [r["name"] for r in res["runs"]] == ["clean", "gn"]
    assert res["runs"][0]["eps"] == pytest.approx([0, 8 / 255, 16 / 255])
    for f in ("report.md", "summary.csv", "accuracy_per_eps.csv", "accuracy_pgd.png"):
        assert (tmp_path / "ev" / f).is_file(), f
    assert main(["transfer", *runs, "--out", str(tmp_path / "tr"), *common, "--eps", "0", "0.1"]) == 0
    tr = json.loads((tmp_path / "tr" / "results.json").read_text())
    assert set(tr["matrix"]) == {"clean", "gn"} and (tmp_path / "tr" / "transfer.png").is_file()
    assert main(["lrc", *runs, "--out", str(tmp_path / "lrc"), "--n-test", "40", "--samples", "5",
                 "--zeta", "1", "4", "--eps", "0", "0.3"]) == 0
    assert (tmp_path / "lrc" / "lrc_eps1.png").is_file()
    assert main(["analyze", runs[0], "--out", str(tmp_path / "an"), *common]) == 0
    an = json.loads((tmp_path / "an" / "results.json").read_text())
    assert len(an["perturbation"]) == len(an["data"]) and an["data"][0] > 0
    assert (tmp_path / "an" / "covariance.png").is_file() and (tmp_path / "an" / "smoothness.png").is_file()
