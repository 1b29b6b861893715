"""The top-level Python API: gradreg.evaluate (accuracies with n, intervals, per-example
outcomes) and gradreg.train."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scipy.stats import binomtest

import gradreg
from gradreg import data
from gradreg.inference import accuracy
from gradreg.judge import evaluate_attack


def test_evaluate_matches_the_judge_and_scipy(digits_cw: torch.nn.Module) -> None:
    bundle = data.load("digits")
    x, y = bundle.test_x[:100], bundle.test_y[:100]
    threat = gradreg.ThreatModel("linf", 0.1, bundle.bounds)
    res = gradreg.evaluate(digits_cw, x, y, threat, attacks=["pgd"], eps=[0.05, 0.1], steps=5, seed=1)
    assert res.n == 100 and res.clean.value == accuracy(digits_cw, x, y)
    pgd = gradreg.attacks.make("pgd", steps=5, seed=1, labels="predicted")
    ref = evaluate_attack(digits_cw, x, y, pgd, threat, [0.05, 0.1])
    assert [iv.value for iv in res.robust["pgd"]] == ref.robust_accuracy
    assert torch.equal(res.outcomes["pgd"], ref.robust)
    assert res.accuracy("pgd", 0.05).value == ref.robust_accuracy[0]
    # the interval is Wilson's; scipy computes it independently
    k = int(res.clean_correct.sum())
    ci = binomtest(k, 100).proportion_ci(confidence_level=0.95, method="wilson")
    assert res.clean.lo == pytest.approx(ci.low, abs=1e-9) and res.clean.hi == pytest.approx(ci.high, abs=1e-9)
    assert "pgd ε=0.05" in res.summary() and res.to_dict()["robust"]["pgd"][1]["n"] == 100


def test_evaluate_rejects_bad_input(digits_cw: torch.nn.Module) -> None:
    threat = gradreg.ThreatModel("linf", 0.1, (0.0, 1.0))
    with pytest.raises(ValueError, match="one label per row"):
        gradreg.evaluate(digits_cw, torch.rand(3, 1, 8, 8), torch.zeros(2, dtype=torch.long), threat)
    with pytest.raises(ValueError, match="larger than the linf diameter"):
        gradreg.evaluate(digits_cw, torch.rand(3, 1, 8, 8), torch.zeros(3, dtype=torch.long), threat, eps=[2.0])


def test_train_returns_the_loaded_run(tmp_path: Path) -> None:
    run = gradreg.train(data="digits", model="mlp", model_params={"hidden": [8]}, epochs=1, quiet=True,
                        out=str(tmp_path / "r"), device="cpu")
    assert run.config["config"]["batch_size"] == 64  # the data set's default, as on the CLI
    assert run.metrics["epochs"] == 1
    assert isinstance(run.model, torch.nn.Module) and run.model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_top_level_names() -> None:
    assert callable(gradreg.penalties.make) and callable(gradreg.attacks.make)
    # plain functions of gradreg.api, not modules made callable
    assert gradreg.evaluate is gradreg.api.evaluate and gradreg.train is gradreg.api.train
