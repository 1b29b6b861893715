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


def _run(args: list[str], nproc: int, *, expect: int = 0) -> str:
    # faulthandler: a rank that dies by a signal prints where it was (Python stack, or "finalizing")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "gradreg", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "gradreg", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    # torchrun's summary fills the end of stderr; what the failing rank printed comes before it
    err = done.stderr if len(done.stderr) <= 8000 else done.stderr[:4000] + "\n[…]\n" + done.stderr[-4000:]
    assert done.returncode == expect, err
    return done.stderr


def _compare(a: Path, b: Path, *, atol: float) -> None:
    """Weights within ``atol``; test accuracy within 2 of 360 points (6 when the weights may
    differ by more than float rounding: a near-chance model's argmax then flips on a few)."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < atol, worst
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    points = 2 if atol <= 1e-5 else 6
    assert ma["test_accuracy"] == pytest.approx(mb["test_accuracy"], abs=points / 360 + 1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("method,extra,atol", [
    ("clean", [], 1e-5),
    ("gn", ["--lam", "1"], 1e-5),
    ("sgr", ["--lam", "1", "--set", "penalty.source=\"pgd\"", "--set", "penalty.update_every=2"], 1e-5),
    # TRADES' inner attack takes sign steps: a per-sample gradient component near 0 can change
    # sign when a batch of 32 instead of 64 reorders float sums, and that pixel then moves by 2η.
    # The runs agree at the first step exactly and stay within 2e-3 after an epoch.
    ("trades", ["--set", "penalty.steps=3", "--set", "penalty.eps=0.1"], 2e-3),
    # fused clean pass: the clean parameter gradient enters through a surrogate (DataGrad fd,
    # clean weight 1 − λ/φ = 0.5) or not at all (Lyu one-step with λ = 1); ℓ2 directions, which
    # do not flip with float reordering
    ("datagrad", ["--lam", "0.005", "--set", "penalty.p=2", "--set", "penalty.solver=\"fd\""], 1e-5),
    # Lyu ℓ2: r* = σ·g/‖g‖ is float noise for a sample whose gradient vanishes, so it differs
    # between splits; a wrong or missing gradient reduction would differ by ~1e-2
    ("lyu", ["--lam", "1", "--set", "penalty.norm=\"l2\"", "--set", "penalty.solver=\"onestep\""], 1e-3),
])
def test_two_ranks_match_one(tmp_path: Path, method: str, extra: list[str], atol: float) -> None:
    """Same global batch and seed: DDP's averaged gradients, the rank-averaged SGR covariance
    and the rank-independent random starts reproduce the 1-process run."""
    args = [*COMMON, "--method", method, *extra]
    _run([*args, "--out", str(tmp_path / "one")], 1)
    _run([*args, "--out", str(tmp_path / "two")], 2)
    _compare(tmp_path / "one", tmp_path / "two", atol=atol)
    assert not (tmp_path / "two" / "checkpoint.safetensors.tmp").exists()


@pytest.mark.slow
def test_opnorm_warm_start_buffer_is_complete_under_two_ranks(tmp_path: Path) -> None:
    """Every example's warm-start vector reaches rank 0's checkpoint, whichever rank saw it."""
    from gradreg import checkpoint

    args = [*COMMON, "--method", "opnorm", "--set", "penalty.warm_start=true", "--set", "penalty.norm=\"l2\"",
            "--set", "penalty.eps=0.5"]
    _run([*args, "--out", str(tmp_path / "one")], 1)
    _run([*args, "--out", str(tmp_path / "two")], 2)
    g1, _ = checkpoint.load(tmp_path / "one" / checkpoint.CURRENT)
    g2, _ = checkpoint.load(tmp_path / "two" / checkpoint.CURRENT)
    v1, v2 = g1["objective"]["penalties.opnorm.u_buf"], g2["objective"]["penalties.opnorm.u_buf"]
    assert v1.shape == v2.shape
    # A row that never reached rank 0 would still hold its cold start, a random unit vector (cosine
    # near 0). A row that did reach it agrees in direction; its digits need not agree: the 2-rank
    # run sums in another order, and the warm start carries that difference from step to step,
    # most where the top two singular values of J(x) nearly tie (on this 2-core machine 174 of the
    # 1,437 rows differ by more than 1e-3, the largest by 0.13; every cosine is at least 0.97).
    cos = torch.nn.functional.cosine_similarity(v1.flatten(1), v2.flatten(1), dim=1)
    assert float(cos.min()) > 0.9
    close = (v1 - v2).flatten(1).abs().amax(dim=1) < 1e-3
    assert float(close.float().mean()) > 0.75


@pytest.mark.slow
def test_resume_under_other_world_size(tmp_path: Path) -> None:
    args = [*COMMON, "--epochs", "2", "--method", "clean"]
    _run([*args, "--out", str(tmp_path / "ref")], 1)
    _run([*args, "--out", str(tmp_path / "mixed"), "--stop-after-epoch", "1"], 2)
    _run([*args, "--out", str(tmp_path / "mixed"), "--resume"], 1)
    _compare(tmp_path / "ref", tmp_path / "mixed", atol=1e-5)


def test_batch_noise_is_independent_of_the_split() -> None:
    """The penalties' random draws for a global batch are the same however it is split."""

    from gradreg.penalties.base import BatchNoise
    from gradreg.threat import ThreatModel

    x = torch.rand(10, 1, 4, 4)
    threat = ThreatModel("l2", 0.3, (0, 1))
    whole = threat.random_start(x, sampler=BatchNoise(5, torch.arange(10), 10))
    halves = [threat.random_start(x[r::2], sampler=BatchNoise(5, torch.arange(10)[r::2], 10)) for r in range(2)]
    assert torch.equal(whole[0::2], halves[0]) and torch.equal(whole[1::2], halves[1])
    other_step = threat.random_start(x, sampler=BatchNoise(6, torch.arange(10), 10))
    assert not torch.equal(whole, other_step)


@pytest.mark.slow
def test_two_rank_evaluation_equals_one(tmp_path: Path) -> None:
    _run([*COMMON, "--method", "clean", "--out", str(tmp_path / "run")], 1)
    ev = ["eval", str(tmp_path / "run"), "--n-test", "150", "--steps", "5", "--batch-size", "32",
          "--eps", "0", "0.05", "0.1", "--no-deepfool"]
    _run([*ev, "--out", str(tmp_path / "e1")], 1)
    _run([*ev, "--out", str(tmp_path / "e2")], 2)
    r1, r2 = (json.loads((tmp_path / e / "results.json").read_text())["runs"][0] for e in ("e1", "e2"))
    assert r1["curves"] == r2["curves"] and r1["clean"] == r2["clean"]
    assert r1["curves"]["pgd"][-1] < r1["clean"]  # the attack did something


def test_leave_flushes_output_and_skips_finalization() -> None:
    """A torchrun rank leaves by ``distributed.leave``: what it printed arrives, its status is
    the one given, and interpreter finalization (here: an atexit handler) never runs."""
    script = ("import atexit, sys\n"
              "from gradreg import distributed\n"
              "atexit.register(lambda: print('finalized', flush=True))\n"
              "print('result line')\n"
              "print('error line', file=sys.stderr)\n"
              "distributed.leave(7)\n"
              "print('after leave')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 7
    assert done.stdout == "result line\n" and done.stderr == "error line\n"


@pytest.mark.slow
def test_an_error_in_every_rank_reaches_torchrun_as_its_status(tmp_path: Path) -> None:
    """A user's error raised after the ranks joined their group: each rank prints one error line
    and leaves with status 2 (not 1, not a signal), which torchrun's summary reports."""
    err = _run(["eval", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "e")], 2, expect=1)
    assert err.count("gradreg: error:") == 2, err
    assert err.count("exitcode  : 2") == 2, err
    assert "Signal" not in err and "Traceback (most recent call last)" in err  # torchrun's own


def test_main_called_inside_a_callers_process_group_returns_and_leaves_the_group_up(tmp_path: Path) -> None:
    """A program that owns its process group and calls ``gradreg.cli.main`` gets its status back
    and keeps its group: gradreg leaves only a group it joined itself."""
    script = ("import torch.distributed as dist\n"
              "from gradreg import cli\n"
              f"dist.init_process_group('gloo', init_method={(tmp_path / 'store').as_uri()!r}, rank=0, world_size=1)\n"
              "code = cli.main(['list'])\n"
              "print('status', code, 'group up', dist.is_initialized())\n"
              "dist.destroy_process_group()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "status 0 group up True"
