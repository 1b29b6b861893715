"""The catastrophic-overfitting monitor (gradreg.monitor) in the training loop: a planted collapse
is flagged, a normal run is not; warn / stop / restore; log columns; exact resume; BatchNorm."""
from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from gradreg import checkpoint, data, models, penalties
from gradreg.config import ConfigError, TrainConfig
from gradreg.monitor import FIELDS, MONITOR_SEED, OverfitMonitor, fixed_subset
from gradreg.threat import ThreatModel
from gradreg.trainer import Trainer, TrainingInterrupted, train

LATTICE = 16  # digits pixels are k/16 (scikit-learn's 0..16 grey levels scaled to [0, 1])
EPS = 1 / LATTICE  # a monitor radius on the lattice: x ± ε stays on it


class TrapNet(nn.Module):
    """A small MLP with a planted catastrophic overfit. Once ``armed`` (a buffer, so it is part of
    the weights) it adds A·s(x) to the logit of the class after its own prediction, with
    s(x) = Σᵢ sin²(16π·xᵢ): zero, with zero gradient, on the 1/16 lattice of the digits pixels,
    positive off it. At ε = 1/16 FGSM starts on the lattice (so it sees the plain MLP's gradient)
    and ends on it (x ± ε, clipped), so FGSM accuracy is the MLP's; PGD starts off the lattice,
    where the trap misclassifies, and its ascent climbs s. Training inputs are lattice points,
    where the trap is exactly zero: arming it never changes a training step."""

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.net = models.make("mlp", **{**params, "hidden": (32,)})
        self.register_buffer("armed", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)  # (N, K)
        s = torch.sin(LATTICE * torch.pi * x.flatten(1)).pow(2).sum(dim=1)  # (N,)
        s = torch.where(s > 1e-6, s, torch.zeros_like(s))  # float rounding on the lattice is zero
        wrong = F.one_hot((logits.argmax(dim=1) + 1) % logits.shape[1], logits.shape[1])  # (N, K)
        return logits + (100.0 * self.armed) * s[:, None] * wrong


class SmallBN(nn.Module):
    """Conv–BatchNorm–ReLU → linear: a model whose running statistics the monitor must not move."""

    def __init__(self, *, in_shape: tuple[int, int, int], num_classes: int, **_: Any) -> None:
        super().__init__()
        c, h, w = in_shape
        self.body = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(8 * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


READINGS: list[dict[str, Any]] = []


class Listener(penalties.Penalty):
    """A zero penalty that records what the monitor hands to ``on_monitor``."""

    requires = penalties.Requirements(clean_graph=False, input_dependent=False)

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> penalties.Term:
        return penalties.Term(next(model.parameters()).sum() * 0.0)

    def on_monitor(self, **reading: Any) -> None:
        READINGS.append(reading)


@pytest.fixture(autouse=True, scope="module")
def _test_members() -> Iterator[None]:
    """The planted model, a BatchNorm model and the listener, registered for this module's tests
    only: registered at import they would join every table-driven test collected after it."""
    added = []
    for name, factory, registry in (("monitor-trap", TrapNet, models.MODELS), ("monitor-bn", SmallBN, models.MODELS),
                                    ("monitor-listener", Listener, penalties.PENALTIES)):
        if name not in registry:
            registry.register(name)(factory)  # type: ignore[attr-defined]
            added.append((registry, name))
    yield
    for registry, name in added:
        registry.unregister(name)  # type: ignore[attr-defined]


def _cfg(tmp_path: Path, name: str, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(data="digits", model="monitor-trap", epochs=3, batch_size=64, lr=3e-3, seed=0,
                                quiet=True, monitor_eps=EPS, out=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def _arm_at(trainer: Trainer, global_step: int) -> Trainer:
    """Arm the trap after the given global step (between two checks)."""
    original = trainer.train_step

    def step(*args: Any, **kw: Any) -> Any:
        out = original(*args, **kw)
        if trainer.state.global_step == global_step:
            trainer.model.armed.fill_(1.0)  # type: ignore[operator]
        return out

    trainer.train_step = step  # type: ignore[method-assign]
    return trainer


def _rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "log.csv").open()))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _quiet(_: str) -> None:
    pass


STEPS = 23  # digits: 1437 training points, batch 64


def _fgsm_accuracy_by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """FGSM accuracy written out (float64 model copy): correct clean and at clip(x + ε·sign ∇ₓCE)."""
    m = _double(model)
    xd = x.double().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(m(xd), y, reduction="sum"), xd)
    x_adv = (x.double() + eps * g.sign()).clamp(0, 1)
    with torch.no_grad():
        ok = (m(x.double()).argmax(1) == y) & (m(x_adv).argmax(1) == y)
    return int(ok.sum()) / len(y)


def _double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double().eval()


# ----- flagging -------------------------------------------------------------------------------
def test_planted_collapse_is_flagged_and_warn_continues(tmp_path: Path) -> None:
    lines: list[str] = []
    READINGS.clear()
    trainer = _arm_at(Trainer(_cfg(tmp_path, "warn", add=[{"method": "monitor-listener", "lam": 1.0}]),
                              log=lines.append), STEPS + 1)
    metrics = trainer.fit()
    rows = _rows(tmp_path / "warn")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # warn: training goes on
    pgd = [float(r["monitor_pgd_accuracy"]) for r in rows]
    fgsm = [float(r["monitor_fgsm_accuracy"]) for r in rows]
    assert [int(r["monitor_overfit"]) for r in rows] == [0, 1, 1], (pgd, fgsm)
    assert pgd[0] > 0.3 and pgd[1] < 0.05 and fgsm[1] > 0.3  # the planted collapse, as designed
    flagged = metrics["monitor"]["overfit"]
    assert [(c["epoch"], c["step"]) for c in flagged] == [(2, 2 * STEPS), (3, 3 * STEPS)]
    warnings = [ln for ln in lines if "catastrophic overfitting" in ln]
    assert len(warnings) == 2 and "epoch 2" in warnings[0] and "\n" not in warnings[0]
    # the penalty hook saw every check, in order, with the logged numbers
    assert [(r["pgd_accuracy"], r["overfit"]) for r in READINGS] == list(zip(pgd, [False, True, True]))
    saved = json.loads((tmp_path / "warn" / "metrics.json").read_text())["monitor"]
    assert saved["source"] == "train batch" and saved["points"] == 256 and saved["eps"] == EPS
    assert saved["outcome"] == "completed" and len(saved["overfit"]) == 2


def test_check_numbers_match_an_independent_fgsm(tmp_path: Path) -> None:
    """The first check's FGSM accuracy equals FGSM written out by hand on the same fixed rows."""
    train(_cfg(tmp_path, "one", epochs=1), log=_quiet)
    model = models.make("monitor-trap", in_shape=(1, 8, 8), num_classes=10)
    model.load_state_dict(_weights(tmp_path / "one"))
    bundle = data.load("digits")
    rows = torch.randperm(len(bundle.train_y), generator=torch.Generator().manual_seed(MONITOR_SEED))[:256]
    expected = _fgsm_accuracy_by_hand(model, bundle.train_x[rows], bundle.train_y[rows], EPS)
    logged = float(_rows(tmp_path / "one")[0]["monitor_fgsm_accuracy"])
    assert abs(logged - expected) <= 1 / 256  # at most one point on a sign flip of a ~0 gradient


def test_normal_run_stays_silent_and_logs_the_columns(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines: list[str] = []
    metrics = train(_cfg(tmp_path, "plain", model="mlp", method="fgsm-at", epochs=3, monitor_eps=None, lr=1e-3,
                         log="tensorboard"), log=lines.append)
    rows = _rows(tmp_path / "plain")
    assert set(FIELDS) <= set(rows[0]) and [r["monitor_overfit"] for r in rows] == ["0", "0", "0"]
    assert all(0 <= float(r[f]) <= 1 for r in rows for f in FIELDS[:2])
    assert not any("catastrophic" in ln for ln in lines)
    assert metrics["monitor"]["overfit"] == [] and metrics["monitor"]["eps"] == pytest.approx(8 / 255)  # fgsm-at's ε
    events = EventAccumulator(str(tmp_path / "plain" / "tensorboard"))
    events.Reload()
    for name in FIELDS:
        assert [p.value for p in events.Scalars(name)] == pytest.approx([float(r[name]) for r in rows]), name


def test_monitor_off_leaves_the_columns_empty_and_trains_the_same_weights(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "on", epochs=2), log=_quiet)
    train(_cfg(tmp_path, "off", epochs=2, monitor=False), log=_quiet)
    on, off = _weights(tmp_path / "on"), _weights(tmp_path / "off")
    assert all(torch.equal(on[k], off[k]) for k in on)
    assert [r["monitor_pgd_accuracy"] for r in _rows(tmp_path / "off")] == ["", ""]
    assert "monitor" not in json.loads((tmp_path / "off" / "metrics.json").read_text())


# ----- stop / restore -------------------------------------------------------------------------
def test_restore_ends_on_the_weights_of_the_last_check_before_the_drop(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "epoch1", epochs=1, monitor=False), log=_quiet)  # the pre-collapse weights, independently
    lines: list[str] = []
    metrics = _arm_at(Trainer(_cfg(tmp_path, "restore", on_overfit="restore"), log=lines.append), STEPS + 5).fit()
    before, after = _weights(tmp_path / "epoch1"), _weights(tmp_path / "restore")
    assert after["armed"].item() == 0.0
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert metrics["monitor"]["outcome"] == "restored" and metrics["monitor"]["restored_step"] == STEPS
    assert len(_rows(tmp_path / "restore")) == 2 and any("restoring the weights of step 23" in ln for ln in lines)
    # the run is over: --resume does not train on
    again = train(_cfg(tmp_path, "restore", on_overfit="restore"), resume=True, log=_quiet)
    assert again["steps"] == 2 * STEPS and all(torch.equal(before[k], v) for k, v in _weights(tmp_path / "restore").items())


def test_stop_ends_at_the_flagged_check_every_n_steps(tmp_path: Path) -> None:
    every, armed_at = 5, STEPS + 3  # checks at steps 5, 10, …; armed after step 26 → flagged at 30
    metrics = _arm_at(Trainer(_cfg(tmp_path, "stop", on_overfit="stop", monitor_every_steps=every), log=_quiet),
                      armed_at).fit()
    assert metrics["steps"] == 30 and metrics["monitor"]["outcome"] == "stopped"
    assert [c["step"] for c in metrics["monitor"]["overfit"]] == [30]
    assert metrics["monitor"]["checks"] == 6
    weights = _weights(tmp_path / "stop")
    assert weights["armed"].item() == 1.0  # stop keeps the weights it stopped at
    rows = _rows(tmp_path / "stop")
    assert [(r["epoch"], r["step"], r["monitor_overfit"]) for r in rows] == [("1", "23", "0"), ("2", "30", "1")]
    groups, meta = checkpoint.load(tmp_path / "stop" / checkpoint.CURRENT)
    assert meta["state"]["global_step"] == 30 and meta["monitor"]["outcome"] == "stopped"
    assert "monitor" not in groups  # no snapshot kept unless on_overfit = restore


# ----- resume ---------------------------------------------------------------------------------
def test_resume_with_the_monitor_is_bitwise_identical(tmp_path: Path) -> None:
    kw: dict[str, Any] = dict(on_overfit="restore", monitor_every_steps=7, epochs=3)
    full = _arm_at(Trainer(_cfg(tmp_path, "full", **kw), log=_quiet), 40).fit()
    # stopped after epoch 1, then interrupted mid-epoch 2 by a signal, then resumed
    assert train(_cfg(tmp_path, "cut", **kw), stop_after_epoch=1, log=_quiet) == {"stopped_after_epoch": 1}
    cut = _arm_at(Trainer(_cfg(tmp_path, "cut", **kw), log=_quiet), 40)
    original = cut.train_step

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if cut.state.global_step == 30:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    cut.train_step = interrupted  # type: ignore[method-assign]
    with pytest.raises(TrainingInterrupted):
        cut.fit(resume=True)
    resumed = _arm_at(Trainer(_cfg(tmp_path, "cut", **kw), log=_quiet), 40).fit(resume=True)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["monitor"] == resumed["monitor"] and full["monitor"]["outcome"] == "restored"
    _, meta_a = checkpoint.load(tmp_path / "full" / checkpoint.CURRENT)
    _, meta_b = checkpoint.load(tmp_path / "cut" / checkpoint.CURRENT)
    assert meta_a["monitor"] == meta_b["monitor"]


def test_a_checkpoint_without_monitor_state_resumes(tmp_path: Path) -> None:
    """A checkpoint written before the monitor existed (no "monitor" in its metadata) resumes;
    the monitor starts fresh from there."""
    train(_cfg(tmp_path, "old", epochs=2), stop_after_epoch=1, log=_quiet)
    path = tmp_path / "old" / checkpoint.CURRENT
    groups, meta = checkpoint.load(path)
    del meta["monitor"]
    for row in meta["history"]:
        for name in FIELDS:
            row.pop(name, None)
    checkpoint.save(path, groups, meta)
    metrics = train(_cfg(tmp_path, "old", epochs=2), resume=True, log=_quiet)
    assert metrics["monitor"]["checks"] == 1
    rows = _rows(tmp_path / "old")
    assert rows[0]["monitor_pgd_accuracy"] == "" and rows[1]["monitor_pgd_accuracy"] != ""


# ----- BatchNorm --------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_check_keeps_modes_and_batchnorm_statistics(training: bool) -> None:
    """Policy: the monitor attacks and judges in eval mode (running statistics used, never
    updated) and restores every submodule's mode."""
    bundle = data.load("digits")
    torch.manual_seed(0)
    model = SmallBN(in_shape=(1, 8, 8), num_classes=10)
    with torch.no_grad():  # move the running statistics off their initial values first
        model.train()(bundle.train_x[:128])
    model.train(training)
    model.body[1].eval()  # a mixed mode must come back as found, too
    modes = [m.training for m in model.modules()]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = OverfitMonitor(model, bundle.train_x[:64], bundle.train_y[:64], ThreatModel("linf", 0.1, (0.0, 1.0)),
                             source="train batch", drop=0.2, keep_snapshot=True)
    monitor.check(epoch=1, step=1)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())
    assert monitor.snapshot is not None and all(torch.equal(stats[k], v) for k, v in monitor.snapshot.items())


def test_batchnorm_model_trains_the_same_with_the_monitor(tmp_path: Path) -> None:
    kw: dict[str, Any] = dict(model="monitor-bn", method="fgsm-at", epochs=1, monitor_eps=None)
    train(_cfg(tmp_path, "bn-on", monitor_every_steps=5, **kw), log=_quiet)
    train(_cfg(tmp_path, "bn-off", monitor=False, **kw), log=_quiet)
    on, off = _weights(tmp_path / "bn-on"), _weights(tmp_path / "bn-off")
    assert any("running_mean" in k for k in on) and all(torch.equal(on[k], off[k]) for k in on)


# ----- configuration ----------------------------------------------------------------------------
def test_held_out_batch_is_the_validation_split_when_there_is_one(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(tmp_path, "val", validation_fraction=0.2, epochs=1), log=_quiet)
    assert trainer.monitor is not None and trainer.monitor.source == "validation"
    rows = fixed_subset(len(trainer.source.test_y), 256)
    assert torch.equal(trainer.monitor.x, trainer.source.test_x[rows])


def test_config_and_cli_flags(tmp_path: Path) -> None:
    from gradreg.cli import main

    with pytest.raises(ConfigError, match="on_overfit"):
        TrainConfig(on_overfit="panic").validate()
    with pytest.raises(ConfigError, match="needs the monitor"):
        TrainConfig(on_overfit="stop", monitor=False).validate()
    assert main(["train", "--data", "digits", "--model", "mlp", "--epochs", "1", "--quiet", "--no-monitor",
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "--data", "digits", "--model", "mlp", "--epochs", "1", "--quiet", "--monitor-eps", "4/16",
                 "--on-overfit", "restore", "--monitor-every-steps", "10", "--out", str(tmp_path / "b")]) == 0
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["config"]["on_overfit"] == "restore" and saved["resolved"]["monitor"]["eps"] == 0.25
    assert main(["train", "--on-overfit", "panic", "--out", str(tmp_path / "c")]) == 2


def test_streamed_training_data_gives_the_same_held_out_batch(tmp_path: Path) -> None:
    kw: dict[str, Any] = dict(model="mlp", model_params={"hidden": [16]}, epochs=1, monitor_eps=None)
    held = Trainer(_cfg(tmp_path, "mem", data_loader="memory", **kw), log=_quiet)
    streamed = Trainer(_cfg(tmp_path, "stream", data_loader="stream", **kw), log=_quiet)
    assert held.monitor is not None and streamed.monitor is not None
    assert torch.equal(held.monitor.x, streamed.monitor.x) and torch.equal(held.monitor.y, streamed.monitor.y)
    assert held.fit()["monitor"] == streamed.fit()["monitor"]


def test_run_record_reads_flags_and_the_last_checks_gap() -> None:
    """The report's record: the drop rule's flags from metrics.json, the last check's FGSM/PGD from
    the log (rows without a check are skipped), and the gap sign above GAP only."""
    from gradreg.monitor import GAP, run_record

    metrics = {"monitor": {"eps": 0.3, "norm": "linf", "points": 256, "overfit": [{"step": 9}],
                           "best_pgd_accuracy": 0.5, "outcome": "completed"}}
    log = [{"monitor_fgsm_accuracy": "0.6", "monitor_pgd_accuracy": "0.5"},
           {"monitor_fgsm_accuracy": "0.9", "monitor_pgd_accuracy": "0.1"},
           {"monitor_fgsm_accuracy": "", "monitor_pgd_accuracy": ""}]
    rec = run_record(metrics, log)
    assert rec is not None
    assert rec["flags"] == 1 and rec["last_fgsm_accuracy"] == 0.9 and rec["last_pgd_accuracy"] == 0.1
    assert abs(rec["gap"] - 0.8) < 1e-12 and rec["gap_flag"]
    log[1]["monitor_fgsm_accuracy"] = str(0.1 + GAP - 0.01)  # just under the sign
    assert not run_record(metrics, log)["gap_flag"]  # type: ignore[index]
    assert run_record({}, log) is None  # a run without the monitor has no record
