"""Model registry: shapes, parameter counts, normalization inside the model, auxiliary heads."""
from __future__ import annotations

import pytest
import torch

from gradreg import models

SHAPES = {"cw": [(1, 28, 28), (3, 32, 32), (1, 8, 8)], "mlp": [(1, 8, 8), (3, 32, 32)], "resnet18": [(3, 32, 32)],
          "wrn": [(3, 32, 32), (1, 8, 8)], "wrn-28-10": [(3, 32, 32)], "wrn-34-10": [(3, 32, 32)],
          "preact-resnet18": [(3, 32, 32), (1, 28, 28)]}
# tiny widths/depths keep the forward passes fast; the full sizes are checked by parameter count
TINY = {"wrn": {"depth": 10, "widen_factor": 1}, "wrn-28-10": {"depth": 10, "widen_factor": 2},
        "wrn-34-10": {"depth": 10, "widen_factor": 1}, "preact-resnet18": {"width": 4}}


def _conv(cin: int, cout: int) -> int:
    return cin * cout * 9 + cout


def _dense(nin: int, nout: int) -> int:
    return nin * nout + nout


def test_every_model_is_covered() -> None:
    assert set(models.MODELS.names()) == set(SHAPES)


@pytest.mark.parametrize("name,shape", [(n, s) for n, shapes in SHAPES.items() for s in shapes])
def test_models_return_logits(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = models.make(name, in_shape=shape, num_classes=7, **TINY.get(name, {})).eval()
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="expects inputs of shape"):
        model(torch.rand(3, shape[0], shape[1] + 1, shape[2]))


def test_cw_parameter_counts_match_the_architecture() -> None:
    # C&W MNIST: 28 → 26 → 24 → 12 → 10 → 8 → 4, so the first dense layer sees 64·4·4 inputs.
    mnist = _conv(1, 32) + _conv(32, 32) + _conv(32, 64) + _conv(64, 64) + _dense(64 * 16, 200) + _dense(200, 200) + _dense(200, 10)
    assert mnist == 312_202  # the count usually quoted for this network
    assert sum(p.numel() for p in models.make("cw").parameters()) == mnist
    # CIFAR-10 widths: 32 → 30 → 28 → 14 → 12 → 10 → 5
    cifar = _conv(3, 64) + _conv(64, 64) + _conv(64, 128) + _conv(128, 128) + _dense(128 * 25, 256) + _dense(256, 256) + _dense(256, 10)
    assert sum(p.numel() for p in models.make("cw", in_shape=(3, 32, 32)).parameters()) == cifar
    # digits (padded): 8 → 8 → 8 → 4 → 4 → 4 → 2
    digits = _conv(1, 32) + _conv(32, 32) + _conv(32, 64) + _conv(64, 64) + _dense(64 * 4, 200) + _dense(200, 200) + _dense(200, 10)
    assert sum(p.numel() for p in models.make("cw", in_shape=(1, 8, 8)).parameters()) == digits


def test_resnet18_parameter_count() -> None:
    # 11,173,962 is torchvision's resnet18 with a 3×3 stem and 10 classes: 11,689,512 (ImageNet)
    # − 7·7·3·64 (stem) + 3·3·3·64 − 512·1000 − 1000 + 512·10 + 10.
    expected = 11_689_512 - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64 - 512 * 1000 - 1000 + 512 * 10 + 10
    assert sum(p.numel() for p in models.make("resnet18").parameters()) == expected


@pytest.mark.parametrize("name,count", [
    ("wrn-28-10", 36_479_194),  # the counts usually quoted for these CIFAR-10 networks
    ("wrn-34-10", 46_160_474),
    ("preact-resnet18", 11_171_146),
])
def test_robustbench_architectures_parameter_counts(name: str, count: int) -> None:
    assert sum(p.numel() for p in models.make(name).parameters()) == count


def test_wrn_normalization_and_aux_heads() -> None:
    model = models.make("wrn", depth=10, widen_factor=1, mean=[0.5] * 3, std=[0.25] * 3, aux_classes=(2,)).eval()
    x = torch.rand(2, 3, 32, 32)
    main, aux = models.forward_all(model, x)
    assert torch.allclose(main, model.fc(model.features((x - 0.5) / 0.25)))
    assert aux.shape == (2, 2)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        models.make("wrn", depth=12)


def test_normalization_lives_inside_the_model() -> None:
    model = models.make("mlp", in_shape=(1, 8, 8), hidden=(4,), mean=[0.5], std=[0.25]).eval()
    x = torch.rand(2, 1, 8, 8)
    manual = model.head(model.features((x - 0.5) / 0.25))
    assert torch.allclose(model(x), manual)


def test_auxiliary_heads_do_not_change_main_logits_shape() -> None:
    model = models.make("cw", in_shape=(1, 8, 8), aux_classes=(2,)).eval()
    x = torch.rand(4, 1, 8, 8)
    main, aux = models.forward_all(model, x)
    assert main.shape == (4, 10) and aux.shape == (4, 2)
    assert torch.equal(model(x), main)
    assert models.num_heads(model) == 2


def test_auto_model() -> None:
    assert models.auto_name("cifar10", (3, 32, 32)) == "resnet18"
    assert models.auto_name("digits", (1, 8, 8)) == "cw"
    assert models.auto_name("mnist", (1, 28, 28)) == "cw"
