"""Shared fixtures: small trained models on the embedded digits data set."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from gradreg import data, models

# Under pytest-xdist (``-n N``) each worker process gets one torch thread, so that N workers do
# not oversubscribe the cores (tests that measure threading set their own count).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> data.DataBundle:
    return data.load("digits")


def _fit(model: torch.nn.Module, bundle: data.DataBundle, *, epochs: int, seed: int) -> torch.nn.Module:
    """A minimal independent training loop (not gradreg.train), so attack and evaluation tests
    do not depend on the code they would be judging."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    x, y = bundle.train_x, bundle.train_y
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


@pytest.fixture(scope="session")
def digits_cw(digits: data.DataBundle) -> torch.nn.Module:
    """C&W CNN (padded) trained clean on digits, eval mode; ~97% test accuracy."""
    torch.manual_seed(0)
    model = models.make("cw", in_shape=digits.in_shape, num_classes=10, mean=digits.mean, std=digits.std)
    return _fit(model, digits, epochs=8, seed=0)


@pytest.fixture(scope="session")
def digits_mlp(digits: data.DataBundle) -> torch.nn.Module:
    """Small MLP trained clean on digits, eval mode."""
    torch.manual_seed(0)
    model = models.make("mlp", in_shape=digits.in_shape, num_classes=10, hidden=(64,), mean=digits.mean,
                        std=digits.std)
    return _fit(model, digits, epochs=20, seed=0)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of a 1-epoch MLP on digits, for tests of the commands that read runs."""
    from gradreg.config import TrainConfig
    from gradreg.trainer import train

    out = tmp_path_factory.mktemp("run") / "r"
    train(TrainConfig(data="digits", model="mlp", epochs=1, quiet=True, out=str(out),
                      model_params={"hidden": [16]}), log=lambda s: None)
    return out


# GRADREG_TEST_NO_KERNELS=1: the first-order double-backward kernels of gradreg.autodiff are
# switched off for the whole session (as after a failed self-check under another torch), and any
# test that still reaches them fails: CI's proof that the plain composition carries the tests.
NO_KERNELS = os.environ.get("GRADREG_TEST_NO_KERNELS") == "1"
_PLAIN_USES = {"tests": 0, "plain_blocks": 0}  # what the session's summary line reports


@pytest.fixture(autouse=True)
def _no_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not NO_KERNELS:
        yield
        return
    from gradreg import autodiff

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the first-order kernels ran although GRADREG_TEST_NO_KERNELS=1")

    plain = autodiff._nothing

    def counted(req: Any) -> Any:  # efficient_second_order's plain branch: counted, so a run proves it was taken
        _PLAIN_USES["plain_blocks"] += 1
        return plain(req)

    token = autodiff._ENABLED.set(False)
    monkeypatch.setattr(autodiff, "_patched", refuse)
    monkeypatch.setattr(autodiff, "_nothing", counted)
    _PLAIN_USES["tests"] += 1
    try:
        yield
    finally:
        autodiff._ENABLED.reset(token)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if NO_KERNELS:
        terminalreporter.write_line(f"gradreg: first-order kernels off (GRADREG_TEST_NO_KERNELS=1): "
                                    f"{_PLAIN_USES['tests']} tests, {_PLAIN_USES['plain_blocks']} plain-path blocks")
