"""Consistency of the evaluation commands (flags, defaults, results records) and the
per-data-set training defaults."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradreg.cli import build_parser, main
from gradreg.commands.train import config_from_args
from gradreg.config import TrainConfig


def test_eval_and_attack_share_flags_and_defaults() -> None:
    parser = build_parser()
    ev = parser.parse_args(["eval", "r", "--out", "o", "--device", "cuda:1", "--limit", "5"])
    at = parser.parse_args(["attack", "r", "--eps", "0.1", "--device", "cuda:1", "--n-test", "5"])
    assert ev.labels == at.labels == "predicted"
    assert ev.device == at.device == "cuda:1"
    assert ev.n_test == at.limit == 5
    assert ev.batch_size == at.batch_size


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="needs a machine without a second GPU")
@pytest.mark.parametrize("command", [["attack", "{run}", "--eps", "0.1"], ["eval", "{run}", "--out", "{tmp}"]])
def test_missing_cuda_device_is_one_line(command: list[str], run_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace("{run}", str(run_dir)).replace("{tmp}", str(tmp_path / "e")) for a in command]
    assert main([*argv, "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device 'cuda:1' requested" in err[0]


def test_results_json_records_provenance(run_dir: Path, tmp_path: Path) -> None:
    import gradreg

    argv = ["eval", str(run_dir), "--out", str(tmp_path / "e"), "--eps", "0", "0.05", "--steps", "2", "--n-test", "30",
            "--attacks", "pgd", "--no-deepfool", "--seed", "4"]
    assert main(argv) == 0
    rec = json.loads((tmp_path / "e" / "results.json").read_text())["record"]
    assert rec["gradreg"] == gradreg.__version__ and rec["torch"] == torch.__version__
    assert rec["command"].startswith("gradreg eval ") and "--seed 4" in rec["command"]
    assert rec["n"] == 30 and rec["seeds"] == [4] and "git_commit" in rec
    assert main(["attack", str(run_dir), "--eps", "0.05", "--steps", "2", "--limit", "20", "--json",
                 str(tmp_path / "a.json")]) == 0
    rec = json.loads((tmp_path / "a.json").read_text())["record"]
    assert rec["n"] == 20 and rec["command"].startswith("gradreg attack ")


def _cfg(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_per_data_set_training_defaults(tmp_path: Path) -> None:
    from gradreg import data

    digits = _cfg("--data", "digits")
    assert (digits.epochs, digits.batch_size, digits.lr) == (12, 64, 1e-3) == tuple(data.TRAIN_DEFAULTS["digits"].values())
    assert _cfg().epochs == 12  # digits is the default data set
    assert _cfg("--data", "digits", "--epochs", "3").epochs == 3  # a flag wins
    assert _cfg("--data", "digits", "--set", "batch_size=7").batch_size == 7
    toml = tmp_path / "c.toml"
    toml.write_text('data = "mnist10k"\nepochs = 2\n')
    cfg = _cfg("--config", str(toml))
    assert (cfg.epochs, cfg.batch_size) == (2, 128)  # the file's data set's defaults, the file's epochs
    assert _cfg("--data", "x.npz").epochs == TrainConfig().epochs  # external data: the general defaults


def test_list_data_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "data"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split() and ln.split()[0] == "digits")
    assert "12 epochs, batch 64, lr 0.001" in line
