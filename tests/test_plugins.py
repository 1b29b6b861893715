"""Entry-point plugins: a tiny package from tests/plugin_pkg, installed into a temporary
folder, is seen by `gradreg list` and trains with its own data, model and penalty."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    import shutil

    shutil.copytree(ROOT / "tests" / "plugin_pkg", build / "pkg")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(build / "pkg")],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"cannot install the plugin package here: {proc.stderr.strip().splitlines()[-1:]}")
    return str(target)


def _run(plugin_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([plugin_path, str(ROOT / "src")])}
    return subprocess.run([sys.executable, "-m", "gradreg", *args], env=env, capture_output=True, text=True, timeout=300)


def test_list_shows_plugin_members(plugin_path: str) -> None:
    proc = _run(plugin_path, "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("toy-mlp", "toy-blobs", "toy-fgsm", "toy-gn"):
        line = next((ln for ln in lines if ln.split() and ln.split()[0] == name), None)
        assert line is not None, proc.stdout
        assert "[plugin: gradreg-toy-plugin" in line
    assert "Toy MLP from a plugin." in proc.stdout


def test_plugin_trains_and_attacks(plugin_path: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _run(plugin_path, "train", "--data", "toy-blobs", "--model", "toy-mlp", "--method", "toy-gn", "--epochs", "1",
                "--out", str(out), "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    proc = _run(plugin_path, "attack", str(out), "--attack", "toy-fgsm", "--eps", "0.1", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr


def test_no_plugins_without_the_package() -> None:
    from gradreg import models

    assert "toy-mlp" not in models.MODELS  # not installed in this process: nothing leaks in
