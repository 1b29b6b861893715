"""Interruptions, corrupted files, non-finite steps, foreign weights, bad configuration."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from gradreg import checkpoint
from gradreg.config import ConfigError, TrainConfig, apply_overrides
from gradreg.trainer import NonFiniteError, Trainer, load_weights, train
from gradreg.models import make as make_model

SLOW_RUN = ["train", "--data", "digits", "--model", "cw", "--epochs", "2", "--batch-size", "16",
            "--seed", "5", "--checkpoint-every", "7", "--quiet", "--augment"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _cli(args: list[str], **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gradreg", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert _cli([*SLOW_RUN, "--out", str(ref)]).wait(timeout=300) == 0
    rng = random.Random(0)
    kills = 0
    for attempt in range(3):
        proc = _cli([*SLOW_RUN, "--out", str(cut), *(["--resume"] if attempt else [])])
        seen = (cut / checkpoint.CURRENT).stat().st_mtime if (cut / checkpoint.CURRENT).exists() else None
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # wait for a fresh checkpoint, then kill
            path = cut / checkpoint.CURRENT
            if path.exists() and path.stat().st_mtime != seen:
                time.sleep(rng.uniform(0.0, 0.25))
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 2  # the run really was killed mid-way
    _, meta = checkpoint.load(cut / checkpoint.CURRENT)
    assert meta["state"]["global_step"] < 2 * 90  # there is work left to resume
    assert _cli([*SLOW_RUN, "--out", str(cut), "--resume"]).wait(timeout=300) == 0
    a, b = _weights(ref), _weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _small(tmp_path: Path, name: str, **kw: object) -> TrainConfig:
    base = dict(data="digits", model="mlp", epochs=2, batch_size=128, quiet=True, out=str(tmp_path / name),
                model_params={"hidden": [32]})
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_corrupted_checkpoint_falls_back_to_previous(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _small(tmp_path, "r", epochs=3)
    train(cfg, stop_after_epoch=2, log=lambda s: None)
    current = tmp_path / "r" / checkpoint.CURRENT
    _, meta_prev = checkpoint.load(tmp_path / "r" / checkpoint.PREVIOUS)
    raw = bytearray(current.read_bytes())
    raw[-20] ^= 0xFF  # flip bits inside the tensor data
    current.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256"):
        checkpoint.load(current)
    messages: list[str] = []
    trainer = Trainer(cfg, log=messages.append)
    assert trainer.restore()
    assert trainer.state.epoch == meta_prev["state"]["epoch"] == 1
    assert any("previous checkpoint" in m for m in messages)
    current.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    with pytest.raises(checkpoint.CheckpointError, match="truncated|cannot be read"):
        checkpoint.load(current)


def test_nonfinite_loss_stops_with_step_and_method(tmp_path: Path) -> None:
    cfg = _small(tmp_path, "nan", optimizer="sgd", lr=1e30, epochs=2)
    with pytest.raises(NonFiniteError, match=r"epoch 1, step \d+ \(method 'clean'"):
        train(cfg, log=lambda s: None)
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def test_nonfinite_skip_continues(tmp_path: Path) -> None:
    cfg = _small(tmp_path, "skip", optimizer="sgd", lr=1e30, epochs=1, on_nonfinite="skip")
    metrics = train(cfg, log=lambda s: None)
    assert metrics["skipped_steps"] >= 1


def test_cli_nonfinite_exit_code(tmp_path: Path) -> None:
    proc = _cli(["train", "--model", "mlp", "--optimizer", "sgd", "--lr", "1e30", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path / "x")])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "non-finite" in err and "Traceback" not in err


def test_foreign_weights_load_safely(tmp_path: Path) -> None:
    model = make_model("mlp", in_shape=(1, 8, 8), hidden=(8,))
    good = tmp_path / "w.pt"
    torch.save(model.state_dict(), good)
    other = make_model("mlp", in_shape=(1, 8, 8), hidden=(8,))
    load_weights(other, good)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(ValueError, match="cannot be loaded as plain weights"):
        load_weights(other, evil)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(make_model("mlp", in_shape=(1, 8, 8), hidden=(9,)), good)


_VALUES = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.text(max_size=5), st.none(), st.lists(st.floats(0.01, 0.99), max_size=3))


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(["epochs", "batch_size", "lr", "optimizer", "schedule", "lam", "augment",
                            "lr_milestones", "device", "on_nonfinite", "seed", "data", "add", "data_loader",
                            "num_workers", "log"]), value=_VALUES)
def test_config_values_are_accepted_or_rejected_cleanly(key: str, value: object) -> None:
    """Any value either gives a valid config or a ConfigError; never another exception."""
    try:
        apply_overrides(TrainConfig(), {key: value}).validate()
    except ConfigError:
        pass
