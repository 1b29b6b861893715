"""Data from anywhere: tensor files, image folders and package.module:factory data sets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from byo_nets import PairsDataset
from gradreg import data
from gradreg.cli import main


def _images(n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 5, 6, 3), dtype=np.uint8), np.arange(n) % 3


def test_npz_nhwc_uint8_with_fixed_split(tmp_path: Path) -> None:
    x, y = _images(30)
    np.savez(tmp_path / "set.npz", x=x, y=y)
    b = data.load(str(tmp_path / "set.npz"))
    assert b.in_shape == (3, 5, 6) and b.num_classes == 3
    assert len(b.train_y) == 24 and len(b.test_y) == 6  # stratified 80/20
    # every image comes back once, channels first, scaled by 1/255
    got = torch.cat([b.train_x, b.test_x]).permute(0, 2, 3, 1).numpy() * 255
    want = x.astype(np.float32)
    assert np.allclose(np.sort(got.reshape(30, -1), axis=0), np.sort(want.reshape(30, -1), axis=0), atol=1e-3)
    assert sorted(torch.cat([b.train_y, b.test_y]).tolist()) == sorted(y.tolist())
    assert b.bounds == (0.0, 1.0)  # uint8 pixels 0..255 are read as pixel / 255
    again = data.load(str(tmp_path / "set.npz"))
    assert torch.equal(again.test_x, b.test_x)  # the split is fixed


def test_safetensors_with_own_split(tmp_path: Path) -> None:
    x = torch.rand(8, 1, 4, 4)
    y = torch.tensor([0, 1] * 4)
    save_file({"x_train": x, "y_train": y, "x_test": x[:2].clone(), "y_test": y[:2].clone()},
              str(tmp_path / "s.safetensors"))
    b = data.load(str(tmp_path / "s.safetensors"))
    assert torch.equal(b.train_x, x) and torch.equal(b.test_y, y[:2])


def _write_folder(root: Path, counts: dict[str, int], *, size: tuple[int, int] = (6, 5), seed: int = 0) -> dict[str, list[np.ndarray]]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    written: dict[str, list[np.ndarray]] = {}
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        written[cls] = []
        for i in range(n):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
            written[cls].append(arr)
    return written


def test_image_folder_train_test(tmp_path: Path) -> None:
    train = _write_folder(tmp_path / "imgs" / "train", {"cat": 3, "dog": 2})
    _write_folder(tmp_path / "imgs" / "test", {"cat": 1, "dog": 1}, seed=1)
    b = data.load(str(tmp_path / "imgs"))
    assert b.classes == ("cat", "dog") and b.in_shape == (3, 5, 6)
    assert b.train_y.tolist() == [0, 0, 0, 1, 1] and b.test_y.tolist() == [0, 1]
    first = np.round(b.train_x[3].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.array_equal(first, train["dog"][0])  # PNG is lossless


def test_image_folder_single_split_and_errors(tmp_path: Path) -> None:
    _write_folder(tmp_path / "one", {"a": 10, "b": 10})
    b = data.load(str(tmp_path / "one"))
    assert len(b.train_y) == 16 and len(b.test_y) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.external.DataError, match="no class sub-folders"):
        data.load(str(tmp_path / "empty"))


def test_factory_dataset_and_pair() -> None:
    b = data.load("byo_nets:pairs")
    assert b.num_classes == 4 and b.in_shape == (1, 6, 6) and b.classes == PairsDataset.classes
    assert len(b.train_y) == 32 and len(b.test_y) == 8
    pair = data.load("byo_nets:pairs_split")
    ref = PairsDataset(12, seed=1)
    assert torch.equal(pair.test_x, ref.x) and torch.equal(pair.test_y, ref.y)


BAD = [
    ("byo_nets:not_data", "returned int"),
    ("byo_nets:nothing", "has no attribute 'nothing'"),
    ("nomodule_xyz:f", "cannot import 'nomodule_xyz'"),
    ("{tmp}/missing.npz", "neither a registered data set"),
    ("{tmp}/bad.npz", "must hold x and y"),
    ("{tmp}/range.npz", "outside the data set's bounds"),
    ("{tmp}/garbage.safetensors", "not a readable safetensors file"),
    ("{tmp}/few.npz", "cannot make a stratified 80/20 split"),
]


@pytest.mark.parametrize("spec,message", BAD, ids=[m for _, m in BAD])
def test_bad_data_is_one_line_exit_2(spec: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 2, 2)))
    np.savez(tmp_path / "range.npz", x=np.full((20, 2, 2), 3.0, dtype=np.float32), y=np.arange(20) % 2)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a tensor file")
    np.savez(tmp_path / "few.npz", x=np.zeros((20, 2, 2), dtype=np.float32), y=np.arange(20) % 10)
    code = main(["train", "--data", spec.replace("{tmp}", str(tmp_path)), "--epochs", "1", "--out",
                 str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_train_and_eval_on_a_tensor_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = PairsDataset(60)
    np.savez(tmp_path / "pairs.npz", x=ds.x.numpy(), y=ds.y.numpy())
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "pairs.npz"), "--model", "mlp", "--set",
                 "model_params.hidden=[16]", "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    assert main(["attack", str(run), "--eps", "0.05", "--steps", "2", "--device", "cpu"]) == 0
    assert "pairs" in capsys.readouterr().out
