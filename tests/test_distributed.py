"""Data-parallel training under torchrun (gloo, CPU) follows the 1-process run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

COMMON = ["train", "--data", "digits", "--model", "cw", "--epochs", "1", "--batch-size", "64",
          "--optimizer", "sgd", "--lr", "0.05", "--seed", "3", "--quiet"]


def _run(args: list[str], nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "gradreg", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "gradreg", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _compare(a: Path, b: Path, *, atol: float) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < atol, worst
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert ma["test_accuracy"] == pytest.approx(mb["test_accuracy"], abs=1 / 360 + 1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["clean"])
def test_two_ranks_match_one(tmp_path: Path, method: str) -> None:
    args = [*COMMON, "--method", method]
    _run([*args, "--out", str(tmp_path / "one")], 1)
    _run([*args, "--out", str(tmp_path / "two")], 2)
    _compare(tmp_path / "one", tmp_path / "two", atol=1e-5)
    assert not (tmp_path / "two" / "checkpoint.safetensors.tmp").exists()


@pytest.mark.slow
def test_resume_under_other_world_size(tmp_path: Path) -> None:
    args = [*COMMON, "--epochs", "2", "--method", "clean"]
    _run([*args, "--out", str(tmp_path / "ref")], 1)
    _run([*args, "--out", str(tmp_path / "mixed"), "--stop-after-epoch", "1"], 2)
    _run([*args, "--out", str(tmp_path / "mixed"), "--resume"], 1)
    _compare(tmp_path / "ref", tmp_path / "mixed", atol=1e-5)
