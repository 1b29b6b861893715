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
        DataBundle("t", x, y, x, y, num_classes=3)
    with pytest.raises(ValueError, match="outside the data set's bounds"):
        DataBundle("t", x * 255, y, x, y, num_classes=4)
    with pytest.raises(ValueError, match=r"must be \(N, C, H, W\)"):
        DataBundle("t", x.flatten(1), y, x, y, num_classes=4)
