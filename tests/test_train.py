"""The training loop: accuracy, determinism, exact resume, run directory, configuration."""
from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradreg import checkpoint
from gradreg.config import ConfigError, TrainConfig, apply_overrides, parse_set
from gradreg.runs import load_run
from gradreg.trainer import Trainer, TrainingInterrupted, learning_rate, train


def _cfg(tmp_path: Path, name: str, **kw: object) -> TrainConfig:
    base = dict(data="digits", model="cw", epochs=3, batch_size=64, seed=0, quiet=True, out=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_smoke_reaches_95_percent(tmp_path: Path) -> None:
    metrics = train(_cfg(tmp_path, "smoke", epochs=15), log=lambda s: None)
    assert metrics["test_accuracy"] >= 0.95
    run = tmp_path / "smoke"
    for name in ("model.safetensors", "config.json", "metrics.json", "log.csv", checkpoint.CURRENT):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["seed"] == 0 and cfg["versions"]["torch"] == torch.__version__
    assert cfg["config"]["method"] == "clean"
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 16))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test_accuracy"] == pytest.approx(metrics["test_accuracy"]) and saved["train_seconds"] > 0
    # the model reloads from the run directory alone and scores what metrics.json says
    loaded = load_run(run, device="cpu")
    bundle = loaded.data()
    acc = (loaded.model(bundle.test_x).argmax(1) == bundle.test_y).float().mean().item()
    assert acc == pytest.approx(saved["test_accuracy"])


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "a", epochs=2), log=lambda s: None)
    train(_cfg(tmp_path, "b", epochs=2), log=lambda s: None)
    train(_cfg(tmp_path, "c", epochs=2, seed=1), log=lambda s: None)
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("optimizer,schedule", [("adam", "constant"), ("sgd", "cosine")])
def test_resume_after_epoch_equals_uninterrupted(tmp_path: Path, optimizer: str, schedule: str) -> None:
    kw = dict(optimizer=optimizer, schedule=schedule, lr=0.01 if optimizer == "sgd" else 1e-3)
    train(_cfg(tmp_path, "full", epochs=3, **kw), log=lambda s: None)
    stopped = train(_cfg(tmp_path, "part", epochs=3, **kw), stop_after_epoch=1, log=lambda s: None)
    assert stopped == {"stopped_after_epoch": 1} and not (tmp_path / "part" / "model.safetensors").exists()
    train(_cfg(tmp_path, "part", epochs=3, **kw), resume=True, log=lambda s: None)
    full, part = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(full[k], part[k]) for k in full)
    rows = list(csv.DictReader((tmp_path / "part" / "log.csv").open()))
    assert len(rows) == 3


def test_interrupt_mid_epoch_saves_and_resumes_exactly(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "full", epochs=2), log=lambda s: None)
    trainer = Trainer(_cfg(tmp_path, "cut", epochs=2), log=lambda s: None)
    original = trainer.train_step

    def interrupted_after_step_5(batch, epoch):  # type: ignore[no-untyped-def]
        out = original(batch, epoch)
        if trainer.state.global_step == 4:  # the 5th step: a real Ctrl-C arrives during it
            os.kill(os.getpid(), signal.SIGINT)
        return out

    trainer.train_step = interrupted_after_step_5  # type: ignore[method-assign]
    with pytest.raises(TrainingInterrupted, match="step 5"):
        trainer.fit()
    _, meta = checkpoint.load(tmp_path / "cut" / checkpoint.CURRENT)
    assert meta["state"]["global_step"] == 5 and meta["state"]["step_in_epoch"] == 5
    train(_cfg(tmp_path, "cut", epochs=2), resume=True, log=lambda s: None)
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_existing_run_needs_resume_and_matching_config(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "r", epochs=1), log=lambda s: None)
    with pytest.raises(ValueError, match="--resume"):
        train(_cfg(tmp_path, "r", epochs=1), log=lambda s: None)
    with pytest.raises(ValueError, match="lr"):
        train(_cfg(tmp_path, "r", epochs=2, lr=0.5), resume=True, log=lambda s: None)


def test_learning_rate_schedules() -> None:
    cfg = TrainConfig(lr=0.1, schedule="step", lr_milestones=[0.5, 0.75], lr_gamma=0.1)
    assert [learning_rate(cfg, s, 100) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cfg = TrainConfig(lr=0.1, schedule="cosine")
    assert learning_rate(cfg, 0, 100) == pytest.approx(0.1)
    assert learning_rate(cfg, 50, 100) == pytest.approx(0.05)


def test_config_overrides_and_errors() -> None:
    cfg = apply_overrides(TrainConfig(), parse_set(["lr=1e-2", "penalty.sigma=0.5", "data=mnist10k",
                                                    "model_params.hidden=[64, 32]", "augment=true"]))
    assert cfg.lr == 0.01 and cfg.penalty == {"sigma": 0.5} and cfg.data == "mnist10k"
    assert cfg.model_params == {"hidden": [64, 32]} and cfg.augment is True
    with pytest.raises(ConfigError, match="unknown configuration key 'nope'"):
        apply_overrides(TrainConfig(), {"nope": 1})
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        apply_overrides(TrainConfig(), {"epochs": "ten"})
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="rmsprop").validate()


def test_multitask_aux_head_trains(tmp_path: Path) -> None:
    metrics = train(_cfg(tmp_path, "mt", epochs=2, aux="parity"), log=lambda s: None)
    loaded = load_run(tmp_path / "mt", device="cpu")
    assert len(loaded.model.aux_heads) == 1 and loaded.model.aux_heads[0].out_features == 2
    assert 0 <= metrics["test_accuracy"] <= 1


def _legacy_config(method: str, out: Path) -> TrainConfig:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_legacy", Path(__file__).parent / "data/legacy_checkpoints/make.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.config(method, out)


@pytest.mark.parametrize("method", ["gn", "sgr", "opnorm", "snr"])
def test_checkpoint_of_the_earlier_gradreg_resumes(tmp_path: Path, method: str) -> None:
    """A checkpoint written by gradreg before the penalty interface changed (tests/data/
    legacy_checkpoints, epoch 1 of 2) resumes, and its second epoch ends where an uninterrupted
    run of this gradreg does."""
    import shutil

    run = tmp_path / "legacy"
    shutil.copytree(Path(__file__).parent / "data/legacy_checkpoints" / method, run)
    train(_legacy_config(method, run), resume=True, log=lambda s: None)
    train(_legacy_config(method, tmp_path / "fresh"), log=lambda s: None)
    old, new = _weights(run), _weights(tmp_path / "fresh")
    for key in new:
        torch.testing.assert_close(old[key], new[key], rtol=1e-4, atol=1e-5)


def test_checkpoint_of_another_model_fails_with_a_clear_message(tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "legacy"
    shutil.copytree(Path(__file__).parent / "data/legacy_checkpoints/opnorm", run)
    groups, meta = checkpoint.load(run / checkpoint.CURRENT)
    groups["objective"]["penalties.opnorm.u_buf"] = torch.zeros(3, 3)  # state of another data set
    checkpoint.save(run / checkpoint.CURRENT, groups, meta)
    with pytest.raises(ValueError, match="cannot resume .*penalty state does not fit"):
        train(_legacy_config("opnorm", run), resume=True, log=lambda s: None)


def test_penalties_take_the_data_sets_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop hands the data set's bounds to the penalties: the inner attack's box and default
    ε follow them, unless the method's parameters fix the bounds."""
    import dataclasses

    from gradreg import data
    from gradreg.penalties.inner import DEFAULT_EPS

    real_load = data.load

    def wide_load(*args: object, **kwargs: object) -> data.DataBundle:
        return dataclasses.replace(real_load(*args, **kwargs), bounds=(-1.0, 2.0))

    monkeypatch.setattr(data, "load", wide_load)
    trainer = Trainer(_cfg(tmp_path, "b", method="pgd-at", epochs=1), log=lambda s: None)
    threat = trainer.objective.terms()["pgd-at"].threat  # type: ignore[attr-defined]
    assert threat.bounds == (-1.0, 2.0) and threat.eps == pytest.approx(3 * DEFAULT_EPS["linf"])
    fixed = Trainer(_cfg(tmp_path, "f", method="pgd-at", epochs=1, penalty={"bounds": [0.0, 1.0], "eps": 0.1}),
                    log=lambda s: None)
    threat = fixed.objective.terms()["pgd-at"].threat  # type: ignore[attr-defined]
    assert threat.bounds == (0.0, 1.0) and threat.eps == 0.1
