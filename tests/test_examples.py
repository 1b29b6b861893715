"""Every script in examples/ runs, on tiny sizes, as a user would run it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from gradreg import loading, models

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_every_example_is_tested() -> None:
    tested = {"penalty_in_your_loop.py", "evaluate_robustbench_model.py", "several_penalties.py"}
    assert {p.name for p in (ROOT / "examples").glob("*.py")} == tested


def test_penalty_in_your_loop() -> None:
    out = _run("penalty_in_your_loop.py", "--epochs", "1")
    assert "clean:" in out and "pgd ε=0.1:" in out


def test_several_penalties() -> None:
    out = _run("several_penalties.py", "--epochs", "1", "--n-train", "128")
    assert "gn " in out and "trades " in out and "pgd-at " in out and "pgd ε=0.1:" in out


def test_evaluate_robustbench_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in models.make("preact-resnet18").state_dict().items() if k not in ("mu", "sigma")}
    path = loading.robustbench_path("Wong2020Fast", model_dir=tmp_path, dataset="cifar10", threat_model="Linf")
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state}, path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", x=rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8), y=np.arange(60) % 10)
    out = _run("evaluate_robustbench_model.py", "--model-dir", str(tmp_path), "--data", str(tmp_path / "tiny.npz"),
               "--n", "4", "--steps", "2")
    assert "not found" not in out and "(n = 4)" in out and "pgd ε=0.03137" in out
