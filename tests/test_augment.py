"""The SGR paper's preprocessing: mid-range padding for crops, per-image standardization inside
the model (state dict unchanged, re-attached when a run is loaded)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gradreg import models
from gradreg.config import ConfigError, TrainConfig
from gradreg.data.augment import attach_standardization, augment, pad_value_for, standardize_per_image
from gradreg.runs import load_run
from gradreg.trainer import train


def test_mid_padding_fills_the_crop_border_with_the_bounds_middle() -> None:
    assert pad_value_for("zero", (0.0, 1.0)) == 0.0 and pad_value_for("mid", (0.0, 1.0)) == 0.5
    assert pad_value_for("mid", (-1.0, 3.0)) == 1.0
    x = torch.rand(16, 2, 5, 5)
    gen = torch.Generator().manual_seed(3)
    out = augment(x, kind="crop", generator=gen, pad_pixels=2, pad_value=0.5)
    # reference: the same offsets drawn from the same seed, explicit numpy padding with 0.5
    g = torch.Generator().manual_seed(3)
    oy = torch.randint(0, 5, (16,), generator=g)
    ox = torch.randint(0, 5, (16,), generator=g)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=0.5)
    for i in range(16):
        want = padded[i, :, int(oy[i]):int(oy[i]) + 5, int(ox[i]):int(ox[i]) + 5]
        np.testing.assert_array_equal(out[i].numpy(), want)
    assert bool((out == 0.5).any()) and not bool((out == 0.0).any())
    with pytest.raises(ValueError, match="unknown padding"):
        pad_value_for("edge", (0.0, 1.0))


def test_per_image_standardization_matches_numpy() -> None:
    x = torch.rand(5, 3, 4, 4, dtype=torch.float64)
    x[2] = 0.7  # a constant image: std 0 is floored at 1/√d, the result is 0
    got = standardize_per_image(x).numpy()
    flat = x.numpy().reshape(5, -1)
    std = np.maximum(flat.std(axis=1), 1 / np.sqrt(flat.shape[1]))
    want = ((flat - flat.mean(axis=1, keepdims=True)) / std[:, None]).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.abs(got[2]).max() < 1e-12


def test_standardization_is_inside_the_model_with_the_same_state_dict() -> None:
    torch.manual_seed(0)
    kw = dict(in_shape=(1, 4, 4), num_classes=3, hidden=(8,), mean=[0.0], std=[1.0])
    plain = models.make("mlp", **kw).double()
    wrapped = models.make("mlp", **kw).double()
    wrapped.load_state_dict(plain.state_dict())
    assert attach_standardization(wrapped, "per-image") is wrapped
    attach_standardization(wrapped, "per-image")  # idempotent: standardized once
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(wrapped(x), plain(standardize_per_image(x)))
    # ε stays in pixel units: the input gradient goes through the standardization
    (g1,) = torch.autograd.grad(wrapped(x).sum(), x)
    (g2,) = torch.autograd.grad(plain(standardize_per_image(x)).sum(), x)
    assert torch.allclose(g1, g2)
    assert torch.autograd.gradcheck(lambda z: wrapped(z), (x[:2].detach().requires_grad_(True),))
    with pytest.raises(ValueError, match="unknown standardization"):
        attach_standardization(plain, "global")


def test_a_run_trained_with_the_papers_preprocessing_reloads_with_it(tmp_path: Path) -> None:
    cfg = TrainConfig(data="digits", model="mlp", epochs=1, quiet=True, out=str(tmp_path / "run"), augment=True,
                      augment_kind="crop", augment_pad="mid", standardize="per-image")
    metrics = train(cfg, log=lambda s: None)
    loaded = load_run(tmp_path / "run", device="cpu")
    params = loaded.config["resolved"]["model"]["params"]
    assert params["mean"] == [0.0] and params["std"] == [1.0]
    bundle = loaded.data()
    with torch.no_grad():
        acc = (loaded.model(bundle.test_x).argmax(1) == bundle.test_y).float().mean().item()
    assert acc == pytest.approx(metrics["test_accuracy"])
    # the same weights without the hook are another function: the hook really is part of the model
    bare = models.make(loaded.config["resolved"]["model"]["name"], **{**params, "in_shape": tuple(params["in_shape"])})
    bare.load_state_dict(loaded.model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(bare(bundle.test_x[:8]), loaded.model(bundle.test_x[:8]))
    with pytest.raises(ConfigError, match="augment_pad"):
        TrainConfig(augment_pad="edge").validate()
