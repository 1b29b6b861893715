"""The GPU speed paths (bf16 autocast, channels-last, torch.compile), checked on the CPU.

On CUDA they are the same code; a CPU without bf16 units runs them slowly, so the tests take
single steps rather than training runs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradreg.config import ConfigError, TrainConfig
from gradreg.penalties.base import CleanPass
from gradreg.models import make as make_model
from gradreg.data.source import TrainBatch
from gradreg.trainer import Trainer


def _first_rows(trainer: Trainer, n: int = 32) -> TrainBatch:
    """The first ``n`` training rows as step 0 of an epoch (the identity order)."""
    return next(trainer.source.batches(torch.arange(n), batch_size=n))


def _trainer(tmp_path: Path, **kw: object) -> Trainer:
    base: dict = dict(data="digits", model="cw", epochs=1, batch_size=32, quiet=True, out=str(tmp_path / "r"))
    cfg = TrainConfig(**{**base, **kw})
    return Trainer(cfg, log=lambda s: None)


def test_bf16_autocast_step_keeps_penalty_gradients_float32(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, amp="bf16", method="gn", lam=1.0)
    loss, _ = trainer.train_step(_first_rows(trainer), 0)
    assert torch.isfinite(torch.tensor(loss))
    model = make_model("cw", in_shape=(1, 8, 8))
    x, y = trainer.source.read(torch.arange(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = CleanPass(model, x, y, need_input_grad=True)
        assert ctx.logits.dtype == torch.bfloat16  # the forward pass really ran in bf16
        assert ctx.input_grad().dtype == torch.float32


def test_channels_last_step_matches_contiguous(tmp_path: Path) -> None:
    a = _trainer(tmp_path / "a", channels_last=True)
    b = _trainer(tmp_path / "b")
    la, _ = a.train_step(_first_rows(a), 0)
    lb, _ = b.train_step(_first_rows(b), 0)
    assert la == pytest.approx(lb, rel=1e-5)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_amp_value_is_validated() -> None:
    with pytest.raises(ConfigError, match="amp"):
        TrainConfig(amp="fp8").validate()


def test_compile_refuses_double_backward_methods(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="double backward"):
        _trainer(tmp_path, compile=True, method="gn")


@pytest.mark.slow
def test_compiled_step_matches_eager(tmp_path: Path) -> None:
    """torch.compile (inductor, C++ on the CPU) gives the eager step to float tolerance."""
    a = _trainer(tmp_path / "a", compile=True, model="mlp")
    b = _trainer(tmp_path / "b", model="mlp")
    la, _ = a.train_step(_first_rows(a), 0)
    lb, _ = b.train_step(_first_rows(b), 0)
    assert la == pytest.approx(lb, rel=1e-5)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n
