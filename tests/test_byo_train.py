"""Training on your own terms: streaming through a DataLoader, several terms (--add), TensorBoard."""
from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from gradreg import checkpoint, data, models, penalties
from gradreg.cli import build_parser, main
from gradreg.commands.train import config_from_args
from gradreg.config import ConfigError, TrainConfig, apply_overrides, parse_term
from gradreg.data import stream
from gradreg.data.source import TensorRows
from gradreg.trainer import Trainer, TrainingInterrupted, build_objective, epoch_order, train


def _cfg(tmp_path: Path, name: str, **kw: object) -> TrainConfig:
    # SGD, not Adam: Adam's division by √v amplifies the last bits of any difference
    base = dict(data="digits", model="mlp", model_params={"hidden": [8]}, epochs=1, batch_size=64, seed=3,
                optimizer="sgd", lr=0.05, quiet=True, out=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _quiet(_: str) -> None:
    pass


# ----- streaming ----------------------------------------------------------------------------
def test_streaming_equals_in_memory_with_augmentation(tmp_path: Path) -> None:
    kw = dict(augment=True, augment_kind="crop-flip")
    train(_cfg(tmp_path, "mem", data_loader="memory", **kw), log=_quiet)
    streamed = Trainer(_cfg(tmp_path, "stream", data_loader="stream", **kw), log=_quiet)
    assert isinstance(streamed.source.rows, stream.DatasetRows)
    streamed.fit()
    mem, st = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert all(torch.equal(mem[k], st[k]) for k in mem)


def test_streaming_a_factory_dataset_with_workers_equals_in_memory(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "mem", data="byo_nets:digits_pair", data_loader="memory"), log=_quiet)
    train(_cfg(tmp_path, "stream", data="byo_nets:digits_pair", data_loader="stream", num_workers=1), log=_quiet)
    mem, st = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    # the streamed per-channel mean/std (float64 sums rounded to float32) equal the in-memory ones here
    assert all(torch.equal(mem[k], st[k]) for k in mem)


def test_interrupted_streaming_run_resumes_exactly(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "full", epochs=2, data_loader="stream", augment=True, augment_kind="crop"), log=_quiet)
    trainer = Trainer(_cfg(tmp_path, "cut", epochs=2, data_loader="stream", augment=True, augment_kind="crop"),
                      log=_quiet)
    original = trainer.train_step

    def interrupted_at_step_30(batch, epoch):  # type: ignore[no-untyped-def]
        out = original(batch, epoch)
        if trainer.state.global_step == 29:  # mid-way through the second epoch
            os.kill(os.getpid(), signal.SIGINT)
        return out

    trainer.train_step = interrupted_at_step_30  # type: ignore[method-assign]
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    train(_cfg(tmp_path, "cut", epochs=2, data_loader="stream", augment=True, augment_kind="crop"),
          resume=True, log=_quiet)
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


@pytest.mark.parametrize("n,batch_size,world", [(10, 4, 2), (11, 5, 3), (7, 7, 2)])
def test_shard_sampler_takes_the_in_memory_rows(n: int, batch_size: int, world: int) -> None:
    order = epoch_order(1, 2, n)
    per_rank = [list(stream.ShardSampler(order, batch_size=batch_size, rank=r, world=world)) for r in range(world)]
    for step in range(-(-n // batch_size)):
        batch = order[step * batch_size:(step + 1) * batch_size].tolist()
        assert [per_rank[r][step] for r in range(world)] == [batch[r::world] for r in range(world)]
    resumed = list(stream.ShardSampler(order, batch_size=batch_size, rank=0, world=world, start=1))
    assert resumed == per_rank[0][1:]


def test_auto_streams_only_a_large_factory_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(Trainer(_cfg(tmp_path, "a", data="byo_nets:digits_pair"), log=_quiet).source.rows, TensorRows)
    monkeypatch.setattr(stream, "STREAM_ABOVE_BYTES", 1000)  # digits' training images: 1,437·64·4 bytes
    streamed = Trainer(_cfg(tmp_path, "b", data="byo_nets:digits_pair"), log=_quiet).source
    assert isinstance(streamed.rows, stream.DatasetRows)
    assert streamed.bounds == (0.0, 1.0)  # the range its batches are converted to (data.external.IMAGE_BOUNDS)
    # gradreg's own data sets and files are held in memory whatever their size
    assert isinstance(Trainer(_cfg(tmp_path, "c"), log=_quiet).source.rows, TensorRows)


def test_streaming_refuses_per_example_state_it_cannot_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "SETUP_ROWS", 100)
    with pytest.raises(ValueError, match="keeps state per training example"):
        Trainer(_cfg(tmp_path, "o", data_loader="stream", method="opnorm", penalty={"warm_start": True}), log=_quiet)


# ----- several terms ------------------------------------------------------------------------
# TRADES without its start noise: the fast path draws random numbers in its own order
ADD_ARGS = ["train", "--method", "gn", "--add", "trades:lam=2,start_std=0", "--add", "fgsm-at:lam=0.5,adv_weight=0.5"]


def test_added_terms_compose_as_the_objective_says() -> None:
    cfg = config_from_args(build_parser().parse_args(ADD_ARGS))
    assert cfg.add == [{"method": "trades", "lam": 2.0, "start_std": 0}, {"method": "fgsm-at", "lam": 0.5, "adv_weight": 0.5}]
    objective, _, _ = build_objective(cfg)
    assert list(objective.lams.items()) == [("gn", penalties.make("gn").default_lam), ("trades", 2.0), ("fgsm-at", 0.5)]
    bundle = data.load("digits")
    x, y = bundle.train_x[:16].double(), bundle.train_y[:16]
    torch.manual_seed(0)
    model = models.make("mlp", in_shape=bundle.in_shape, num_classes=10, hidden=(8,)).double()
    objective.setup(model, x, bounds=bundle.bounds)
    params = list(model.parameters())

    got = torch.autograd.grad(objective(model, x, y).loss, params)
    # the hand composition from fresh penalties: CE + λ₁·pen₁ + λ₂·pen₂ + λ₃·pen₃
    gn, trades, fgsm = penalties.make("gn"), penalties.make("trades", start_std=0.0), penalties.make("fgsm-at", adv_weight=0.5)
    for pen in (gn, trades, fgsm):
        pen.setup(model, x, bundle.bounds)
    hand = (F.cross_entropy(model(x), y) + gn.default_lam * gn(model, x, y) + 2.0 * trades(model, x, y)
            + 0.5 * fgsm(model, x, y))
    want = torch.autograd.grad(hand, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_added_term_state_is_checkpointed_and_resumes(tmp_path: Path) -> None:
    kw = dict(epochs=2, batch_size=256, method="gn", add=[parse_term("opnorm:lam=0.1,warm_start=true")])
    train(_cfg(tmp_path, "full", **kw), log=_quiet)
    assert train(_cfg(tmp_path, "part", **kw), stop_after_epoch=1, log=_quiet) == {"stopped_after_epoch": 1}
    groups, _ = checkpoint.load(tmp_path / "part" / checkpoint.CURRENT)
    assert "penalties.opnorm.u_buf" in groups["objective"]
    train(_cfg(tmp_path, "part", **kw), resume=True, log=_quiet)
    full, part = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(full[k], part[k]) for k in full)
    import json

    record = json.loads((tmp_path / "part" / "config.json").read_text())
    assert record["config"]["add"] == [{"method": "opnorm", "lam": 0.1, "warm_start": True}]
    assert record["resolved"]["terms"]["opnorm"]["lam"] == 0.1
    with pytest.raises(ValueError, match="differs in add"):
        train(_cfg(tmp_path, "part", epochs=3, method="gn"), resume=True, log=_quiet)


def test_added_terms_from_toml_strings_or_tables(tmp_path: Path) -> None:
    from gradreg.config import load_toml

    (tmp_path / "s.toml").write_text('add = ["trades:lam=2,eps=0.1", "gn"]\n')
    (tmp_path / "t.toml").write_text('[[add]]\nmethod = "trades"\nlam = 2\neps = 0.1\n\n[[add]]\nmethod = "gn"\n')
    a = apply_overrides(TrainConfig(), load_toml(tmp_path / "s.toml")).add
    b = apply_overrides(TrainConfig(), load_toml(tmp_path / "t.toml")).add
    assert a == b == [{"method": "trades", "lam": 2.0, "eps": 0.1}, {"method": "gn", "lam": None}]
    assert parse_term('sgr:lam=1,labels="predicted",sizes=[1, 2]') == {
        "method": "sgr", "lam": 1.0, "labels": "predicted", "sizes": [1, 2]}
    for bad in ("", "trades:lam", "trades:=2", "trades:lam=x"):
        with pytest.raises(ConfigError):
            parse_term(bad)


@pytest.mark.parametrize("spec,message", [("nosuch", "unknown method 'nosuch'"), ("trades:lam", "expected key=value"),
                                          ("gn:colour=1", "bad parameters for method 'gn'")])
def test_bad_added_term_is_one_line_and_exit_2(spec: str, message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--add", spec, "--epochs", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gradreg: error: ") and message in err, err


# ----- TensorBoard --------------------------------------------------------------------------
def test_tensorboard_log_holds_the_csv_fields(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(tmp_path, "tb", epochs=2, log="tensorboard"), log=_quiet)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    rows = list(csv.DictReader((tmp_path / "tb" / "log.csv").open()))
    for name in ("train_loss", "train_accuracy", "test_accuracy", "lr", "epoch_seconds"):
        points = events.Scalars(name)
        assert [p.step for p in points] == [1, 2], name
        assert [p.value for p in points] == pytest.approx([float(r[name]) for r in rows], rel=1e-6), name


def test_tensorboard_missing_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert main(["train", "--log", "tensorboard", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install gradreg[tensorboard]" in err, err
    assert not (tmp_path / "r" / "log.csv").exists()


def test_nproc_relaunch_passes_log_past_torchruns_parser() -> None:
    from gradreg.commands.train import strip_nproc

    assert strip_nproc(["train", "--nproc", "2", "--log", "tensorboard", "--stream"]) == [
        "train", "--set", "log=tensorboard", "--stream"]
    assert strip_nproc(["train", "--log=csv", "--nproc=2"]) == ["train", "--set", "log=csv"]
