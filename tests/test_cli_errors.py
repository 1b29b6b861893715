"""Bad input on the command line: one clear line on stderr, exit code 2, never a traceback."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradreg.cli import main
from gradreg.data import DataBundle


CASES = [
    (["train", "--data", "nope"], "unknown data set 'nope'"),
    (["train", "--model", "resnet19"], "unknown model 'resnet19'; did you mean 'resnet18'?"),
    (["train", "--method", "sgrr"], "unknown method 'sgrr'"),
    (["train", "--set", "nope=1"], "unknown configuration key 'nope'"),
    (["train", "--set", "epochs"], "--set expects key=value"),
    (["train", "--epochs", "-1"], "epochs must be ≥ 0"),
    (["train", "--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'"),
    (["train", "--method", "gn", "--set", "penalty.colour=1"], "bad parameters for method 'gn'"),
    (["train", "--config", "/nonexistent.toml"], "config file '/nonexistent.toml' does not exist"),
    (["train", "--data", "mnist", "--data-dir", "/nonexistent"], "/nonexistent"),
    (["train", "--init-weights", "/nonexistent.pt"], "does not exist"),
    (["eval", "{run}", "--out", "{tmp}/e", "--eps", "-0.1"], "ε must be a finite number ≥ 0"),
    (["eval", "{run}", "--out", "{tmp}/e", "--eps", "8"], "larger than the linf diameter"),
    (["eval", "{run}", "--out", "{tmp}/e", "--eps", "1/0"], "cannot read ε"),
    (["eval", "{run}", "--out", "{tmp}/e", "--norm", "l3"], "unknown norm 'l3'"),
    (["eval", "{run}", "--out", "{tmp}/e", "--attacks", "pgdd"], "unknown attack 'pgdd'"),
    (["eval", "{tmp}", "--out", "{tmp}/e"], "is not a finished gradreg run"),
    (["eval", "{tmp}/missing", "--out", "{tmp}/e"], "is not a directory"),
    (["reproduce", "nope", "--out", "{tmp}/x"], "unknown experiment 'nope'"),
    (["reproduce", "--jobs", "0", "demo", "--budget", "tiny", "--out", "{tmp}/x"], "--jobs must be ≥ 1"),
    (["reproduce", "--eval-jobs", "0", "demo", "--budget", "tiny", "--out", "{tmp}/x"], "--eval-jobs must be ≥ 1"),
    (["lrc", "{run}", "--out", "{tmp}/l", "--samples", "0"], "--samples must be ≥ 1"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_bad_input_is_one_clear_line(argv: list[str], message: str, run_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradreg: error: "), err
    assert len(err.splitlines()) == 1, err
    assert message in err, err


def test_data_bundle_refuses_bad_tensors() -> None:
    x, y = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="labels out of range"):
        DataBundle("t", x, y, x, y, num_classes=3, bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match="outside the data set's bounds"):
        DataBundle("t", x * 255, y, x, y, num_classes=4, bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"must be \(N, C, H, W\)"):
        DataBundle("t", x.flatten(1), y, x, y, num_classes=4, bounds=(0.0, 1.0))


def test_data_bounds_come_from_the_data() -> None:
    """No box is assumed: a bundle without bounds is refused, declared bounds other than [0, 1]
    are the ones checked and kept (also when the bundle is streamed or a validation split is
    carved from it)."""
    from gradreg.data.stream import from_bundle
    from gradreg.data.source import TrainSource
    from gradreg.data.validation import carve_validation

    x, y = torch.rand(40, 1, 2, 2), torch.arange(40) % 2
    with pytest.raises(TypeError, match="bounds"):
        DataBundle("t", x, y, x, y, num_classes=2)  # type: ignore[call-arg]  # the point: bounds are required
    pixels = DataBundle("t", x * 255, y, x * 255, y, num_classes=2, bounds=(0.0, 255.0))
    assert pixels.bounds == (0.0, 255.0)
    assert from_bundle(pixels).bounds == (0.0, 255.0)
    assert carve_validation(TrainSource.from_bundle(pixels), fraction=0.25).bounds == (0.0, 255.0)
    below = x * 255
    below[0, 0, 0, 0] = -1.0  # one pixel under the declared box
    with pytest.raises(ValueError, match="outside the data set's bounds"):
        DataBundle("t", below, y, x, y, num_classes=2, bounds=(0.0, 255.0))


@pytest.fixture(scope="module")
def byo_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's BN net as plain weights and as a pickled whole module; weights of a model for
    28×28 inputs (shapes that the 8×8 digits do not fit)."""
    from byo_nets import small_bn_net
    from torch import nn

    folder = tmp_path_factory.mktemp("errs")
    torch.manual_seed(0)
    net = small_bn_net(width=4)
    torch.save(net.state_dict(), folder / "net.pt")
    torch.save(net, folder / "whole.pt")
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).state_dict(), folder / "flat.pt")
    return folder


BYO_CASES = [
    # a model for other inputs than the data's: named in one line, before any attack
    (["attack", "--model", "torch.nn:Sequential", "--weights", "{d}/flat.pt", "--data", "digits", "--eps", "0.1"],
     None),
    (["attack", "--model", "byo_nets:small_bn_net", "--model-param", "width=4", "--weights", "{d}/net.pt",
      "--data", "digits", "--eps", "0.1", "--attack", "autoattack", "--aa-version", "bogus"],
     "--aa-version must be one of standard, rand, plus, custom, got 'bogus'"),
    (["eval", "--model", "byo_nets:small_bn_net", "--model-param", "width=4", "--weights", "{d}/net.pt",
      "--data", "digits", "--out", "{d}/e", "--autoattack", "--aa-version", "bogus"],
     "--aa-version must be one of standard, rand, plus, custom, got 'bogus'"),
    (["attack", "--model", "byo_nets:small_bn_net", "--model-param", "width=4", "--weights", "{d}/whole.pt",
      "--data", "digits", "--eps", "0.1"],
     "holds pickled Python objects"),
    (["eval", "--model", "byo_nets:small_bn_net", "--model-param", "width=4", "--weights", "{d}/whole.pt",
      "--data", "digits", "--out", "{d}/e"],
     "save model.state_dict() instead (or use .safetensors) and give the model with --model"),
    (["attack", "--model", "byo_nets:small_bn_net", "--model-param", "width=4", "--weights", "{d}/net.pt",
      "--data", "digits", "--eps", "0.1", "--bounds", "0,255"],
     "--bounds 0,255 is far wider than the data"),
    (["eval", "--model", "wrn", "--model-param", "depth=10", "--model-param", "widen_factor=1", "--weights",
      "{d}/net.pt", "--data", "digits", "--out", "{d}/e"],
     "it was built for the data's inputs (1, 8, 8) and 10 classes"),
]


@pytest.mark.parametrize("argv,message", BYO_CASES, ids=["shape", "aa-version", "eval-aa-version", "pickled", "pickled-eval", "bounds",
                                                          "wrn-weights"])
def test_model_input_errors_are_one_line(argv: list[str], message: str | None, byo_files: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(d=byo_files) for a in argv]
    if args[2] == "torch.nn:Sequential":  # the flat model: a factory of this test module
        args[2] = "test_cli_errors:flat28"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradreg: error: ") and len(err.splitlines()) == 1, err
    assert "\x1b[" not in err
    if message is None:
        assert "does not take the inputs of data 'digits' (shape (1, 8, 8)" in err, err
    else:
        assert message in err, err


def flat28() -> torch.nn.Module:
    """A model for 28×28 grey inputs."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))


def test_registered_model_takes_the_data_shape(byo_files: Path, tmp_path: Path) -> None:
    """``--model wrn`` is built for the data's channels and classes (1×8×8, 10 on digits)."""
    from safetensors.torch import save_file

    from gradreg import models

    torch.manual_seed(0)
    net = models.make("wrn", depth=10, widen_factor=1, in_shape=(1, 8, 8), num_classes=10)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert main(["attack", "--model", "wrn", "--model-param", "depth=10", "--model-param", "widen_factor=1",
                 "--weights", str(tmp_path / "w.safetensors"), "--data", "digits", "--eps", "0.05", "--steps", "1",
                 "--limit", "4"]) == 0
