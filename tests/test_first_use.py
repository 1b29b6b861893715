"""A new user's first commands, typed as the README shows them: their own BatchNorm CNN in
``mynets.py`` beside them (no PYTHONPATH), through ``train``, ``eval --autoattack`` and
``attack``; every registered architecture through ``eval --autoattack``; evaluation data used
whole; accuracies with n and interval; the plain path of the penalties when the first-order
kernels are off."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import gradreg
from gradreg import data, models
from gradreg.cli import main

SRC = str(Path(gradreg.__file__).resolve().parents[1])
ROOT = Path(SRC).parent

# the user's module: a small BatchNorm CNN that takes the data's shape and classes
MYNETS = '''
import torch
from torch import nn


class SmallBN(nn.Module):
    def __init__(self, channels=1, num_classes=10, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def make_net(in_shape=(1, 8, 8), num_classes=10):
    return SmallBN(channels=in_shape[0], num_classes=num_classes)
'''

# small settings for the architectures that are large by default (the test is about the
# evaluation path, not the model size)
SMALL = {"wrn": ["depth=10", "widen_factor=1"], "wrn-28-10": ["depth=10", "widen_factor=1"],
         "wrn-34-10": ["depth=10", "widen_factor=1"], "mlp": ["hidden=(16,)"]}
AA_CHEAP = ["--aa-param", "n_iter=2", "--aa-param", "n_queries=10", "--aa-param", "n_restarts=1"]


def _gradreg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: from ``cwd``, with gradreg importable but not ``cwd``."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gradreg", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


# ----- 1. every registered architecture through eval --autoattack ---------------------------------
@pytest.mark.parametrize("name", sorted(models.MODELS.names()))
def test_every_architecture_through_eval_autoattack(name: str, tmp_path: Path) -> None:
    """BatchNorm's 0-dim int64 ``num_batches_tracked`` once crashed the model fingerprint of
    the AutoAttack cache. The test points carry the model's own predictions as labels, so
    AutoAttack really attacks them (an untrained model is right on none of the true labels)."""
    params = SMALL.get(name, [])
    bundle = data.load("digits")
    torch.manual_seed(0)
    model = models.make(name, in_shape=bundle.in_shape, num_classes=10,
                        **{k: ast.literal_eval(v) for k, v in (p.split("=") for p in params)}).eval()
    x = bundle.test_x[:6]
    with torch.no_grad():
        y = model(x).argmax(1)
    np.savez(tmp_path / "pts.npz", x=x.numpy(), y=y.numpy())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    argv = ["eval", "--model", name, *[a for p in params for a in ("--model-param", p)],
            "--weights", str(tmp_path / "w.safetensors"), "--data", str(tmp_path / "pts.npz"), "--num-classes", "10", "--out",
            str(tmp_path / "ev"), "--eps", "0", "0.05", "--steps", "2", "--attacks", "pgd", "--no-deepfool",
            "--autoattack", "--aa-n", "2", *AA_CHEAP, "--device", "cpu"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    run = res["runs"][0]
    assert run["n"] == 6 and run["clean"] == 1.0  # the whole file, labelled with the model's predictions
    (aa,) = run["autoattack"]
    assert aa["n"] == 2 and aa["eps"] == pytest.approx(0.05)  # the default ε capped at the grid's largest
    assert aa["run"]["package"] in ("autoattack", "pyautoattack") and aa["run"]["package_version"]
    assert res["record"]["attack_packages"][aa["run"]["package"]] == aa["run"]["package_version"]


# ----- 2. the user's own module, from its folder, without PYTHONPATH ----------------------------
@pytest.fixture(scope="module")
def user_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mynets.py`` and its weights (.pt and .safetensors) trained briefly in plain PyTorch,
    and a copy under ``nets/`` to be named by its path."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "mynets.py").write_text(MYNETS)
    (folder / "nets").mkdir()
    (folder / "nets" / "othernets.py").write_text(MYNETS)
    script = ("import torch, mynets\n"
              "from safetensors.torch import save_file\n"
              "from gradreg import data\n"
              "b = data.load('digits'); torch.manual_seed(0); m = mynets.make_net()\n"
              "opt = torch.optim.Adam(m.parameters(), lr=1e-2)\n"
              "for i in range(0, 1024, 64):\n"
              "    opt.zero_grad(); torch.nn.functional.cross_entropy(m(b.train_x[i:i+64]), b.train_y[i:i+64]).backward(); opt.step()\n"
              "m.eval(); torch.save(m.state_dict(), 'net.pt'); save_file(m.state_dict(), 'net.safetensors')\n")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], cwd=folder, env=env, check=True, timeout=300)
    return folder


def test_own_module_through_eval_autoattack_and_attack(user_folder: Path) -> None:
    done = _gradreg("eval", "--model", "mynets:make_net", "--weights", "net.safetensors", "--data", "digits",
                    "--n-test", "20", "--autoattack", "--aa-n", "5", *AA_CHEAP, "--steps", "2", "--attacks", "pgd",
                    "--no-deepfool", "--out", "ev/", cwd=user_folder)
    assert done.returncode == 0, done.stderr
    res = json.loads((user_folder / "ev" / "results.json").read_text())
    assert res["runs"][0]["n"] == 20 and res["runs"][0]["autoattack"][0]["n"] == 5
    # a path to a .py file, and the .pt weights; attack's JSON names the AutoAttack package
    done = _gradreg("attack", "--model", "./nets/othernets.py:make_net", "--weights", "net.pt", "--data", "digits",
                    "--attack", "autoattack", "--param", "n_iter=2", "--param", "n_queries=10", "--eps", "0.05",
                    "--limit", "8", "--json", "a.json", cwd=user_folder)
    assert done.returncode == 0, done.stderr
    rec = json.loads((user_folder / "a.json").read_text())
    assert rec["n"] == 8 and rec["results"][0]["n"] == 8
    assert rec["record"]["attack"]["package"] in ("autoattack", "pyautoattack")
    assert rec["record"]["attack"]["package_version"] not in ("", "unknown")
    assert "n = 8" in done.stdout and "[" in done.stdout  # the clean accuracy with n and interval


def test_own_batchnorm_module_through_eval_with_autoattack_after_pgd(user_folder: Path) -> None:
    """``--aa-after-pgd`` on the user's BatchNorm module: AutoAttack's column never stands where
    PGD broke, the run records the chaining and the report says it."""
    done = _gradreg("eval", "--model", "mynets:make_net", "--weights", "net.safetensors", "--data", "digits",
                    "--n-test", "20", "--autoattack", "--aa-n", "10", "--aa-after-pgd", *AA_CHEAP, "--steps", "2",
                    "--attacks", "pgd", "--no-deepfool", "--out", "ev-chained/", cwd=user_folder)
    assert done.returncode == 0, done.stderr
    (aa,) = json.loads((user_folder / "ev-chained" / "results.json").read_text())["runs"][0]["autoattack"]
    assert aa["run"]["after_pgd"] and aa["n"] == 10 and aa["accuracy"] <= aa["pgd"]
    assert "only on the points PGD left standing" in (user_folder / "ev-chained" / "report.md").read_text()


def test_own_module_through_train_toml_and_eval_run(user_folder: Path, tmp_path: Path) -> None:
    done = _gradreg("train", "--model", "mynets:make_net", "--data", "digits", "--epochs", "1", "--out", "runs/a",
                    cwd=user_folder)
    assert done.returncode == 0, done.stderr
    assert "n = 360" in done.stdout and "95 % Wilson interval" in done.stdout
    cfg = json.loads((user_folder / "runs" / "a" / "config.json").read_text())
    assert cfg["config"]["model"] == "mynets:make_net"
    assert cfg["resolved"]["model"]["file"] == str((user_folder / "mynets.py").resolve())
    eval_args = ["--out", str(tmp_path / "e"), "--eps", "0", "0.05", "--steps", "2", "--attacks", "pgd",
                 "--no-deepfool", "--n-test", "10"]
    # from another folder: the module is found again through the file recorded in the run
    done = _gradreg("eval", str(user_folder / "runs" / "a"), *eval_args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # the module moved away: one clear line, exit 2
    moved = tmp_path / "moved"
    moved.mkdir()
    (user_folder / "mynets.py").rename(moved / "mynets.py")
    try:
        done = _gradreg("eval", str(user_folder / "runs" / "a"), *eval_args, cwd=tmp_path)
    finally:
        (moved / "mynets.py").rename(user_folder / "mynets.py")
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "needs its model mynets:make_net" in err[0] and "is gone" in err[0], done.stderr


def test_toml_names_the_module_as_the_flag_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradreg.cli import build_parser
    from gradreg.commands.train import config_from_args
    from gradreg.trainer import build_model

    (tmp_path / "tomlnets.py").write_text(MYNETS)
    (tmp_path / "c.toml").write_text('model = "tomlnets:make_net"\ndata = "digits"\nepochs = 0\n')
    monkeypatch.chdir(tmp_path)
    cfg = config_from_args(build_parser().parse_args(["train", "--config", "c.toml"]))
    assert cfg.model == "tomlnets:make_net"
    try:
        model, record = build_model(cfg, data.load("digits"))
    finally:
        sys.modules.pop("tomlnets", None)
    assert type(model).__name__ == "SmallBN" and record["params"] == {"in_shape": [1, 8, 8], "num_classes": 10}
    assert record["file"] == str((tmp_path / "tomlnets.py").resolve())


def test_python_train_takes_a_module_a_factory_or_a_spec(tmp_path: Path) -> None:
    from byo_nets import SmallBNNet, small_bn_net

    from gradreg.loading import LIVE_MODELS

    net = SmallBNNet(width=4)
    try:
        run = gradreg.train(data="digits", model=net, epochs=0, out=str(tmp_path / "inst"), quiet=True, log=lambda s: None)
        torch.testing.assert_close(run.model.state_dict()["fc.weight"], net.state_dict()["fc.weight"])
        run = gradreg.train(data="digits", model=small_bn_net, model_params={"width": 4}, epochs=0,
                            out=str(tmp_path / "fac"), quiet=True, log=lambda s: None)
        assert run.config["resolved"]["model"]["name"] == "byo_nets:small_bn_net"
        assert run.config["resolved"]["model"]["params"] == {"width": 4}
    finally:
        LIVE_MODELS.clear()
    run = gradreg.train(data="digits", model="byo_nets:small_bn_net", epochs=0, out=str(tmp_path / "spec"),
                        quiet=True, log=lambda s: None)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in run.model.modules()) == 2


def test_python_train_unknown_keyword_and_method_say_did_you_mean(tmp_path: Path) -> None:
    from gradreg.config import ConfigError
    from gradreg.registry import UnknownNameError

    with pytest.raises(ConfigError, match="unknown keyword 'methd'; did you mean 'method'"):
        gradreg.train(data="digits", methd="gn", out=str(tmp_path / "x"))
    with pytest.raises(UnknownNameError, match="did you mean 'sgr'"):
        gradreg.train(data="digits", method="sgrr", out=str(tmp_path / "x"))


# ----- 3. evaluation data used whole ---------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("w")
    bundle = data.load("digits")
    torch.manual_seed(0)
    model = models.make("mlp", in_shape=bundle.in_shape, num_classes=10, hidden=(16,))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "mlp.safetensors"))
    return folder / "mlp.safetensors"


@pytest.mark.parametrize("keys", [("x", "y"), ("x_test", "y_test")])
def test_a_360_image_file_is_judged_on_360(keys: tuple[str, str], weights: Path, tmp_path: Path) -> None:
    bundle = data.load("digits")
    assert len(bundle.test_y) == 360
    f = tmp_path / "digits360.npz"
    np.savez(f, **{keys[0]: (bundle.test_x.numpy() * 255).round().astype(np.uint8), keys[1]: bundle.test_y.numpy()})
    model = ["--model", "mlp", "--model-param", "hidden=(16,)", "--weights", str(weights), "--data", str(f)]
    assert main(["attack", *model, "--eps", "0.05", "--steps", "2", "--json", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["n"] == 360
    assert main(["eval", *model, "--eps", "0", "0.05", "--steps", "2", "--attacks", "pgd", "--no-deepfool",
                 "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["runs"][0]["n"] == 360 and res["record"]["n"] == 360


def test_test_arrays_alone_cannot_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "t.npz"
    np.savez(f, x_test=np.zeros((20, 8, 8), np.uint8), y_test=np.arange(20) % 2)
    assert main(["train", "--data", str(f), "--epochs", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only x_test and y_test" in err[0]


def test_run_on_a_relative_file_is_evaluated_from_elsewhere_and_data_overrides(tmp_path: Path, weights: Path,
                                                                               capsys: pytest.CaptureFixture[str],
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = data.load("digits")
    work = tmp_path / "work"
    work.mkdir()
    np.savez(work / "d.npz", x=bundle.train_x[:200].numpy(), y=bundle.train_y[:200].numpy())
    monkeypatch.chdir(work)
    assert main(["train", "--data", "d.npz", "--model", "mlp", "--set", "model_params.hidden=[8]", "--epochs", "0",
                 "--out", "run"]) == 0
    cfg = json.loads((work / "run" / "config.json").read_text())
    assert cfg["config"]["data"] == str((work / "d.npz").resolve())
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["attack", "work/run", "--eps", "0.05", "--steps", "2", "--json", "a.json"]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["n"] == 40  # its own 80/20 test split
    assert "(--data)" not in capsys.readouterr().err
    np.savez(tmp_path / "other.npz", x=bundle.test_x[:50].numpy(), y=bundle.test_y[:50].numpy())
    assert main(["attack", "work/run", "--data", "other.npz", "--eps", "0.05", "--steps", "2", "--json", "b.json"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["n"] == 50  # the other file, whole
    err = capsys.readouterr().err
    assert "evaluating run on other.npz (--data)" in err


def test_robustbench_example_reports_the_n_asked_for(tmp_path: Path) -> None:
    """10 labelled images in a file, --n 10: judged on 10 (an 80/20 cut would leave 2)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", x=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), y=np.arange(10) % 5)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "evaluate_robustbench_model.py"), "--n", "10",
                           "--steps", "1", "--model-dir", str(tmp_path), "--data", str(tmp_path / "tiny.npz")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "(n = 10)" in proc.stdout, proc.stdout


# ----- 5. uneven results -------------------------------------------------------------------------------
def test_default_autoattack_eps_lies_on_the_default_grid() -> None:
    from gradreg.commands.eval import default_aa_eps
    from gradreg.protocols import EvalSettings, default_grid

    for name in ("digits", "mnist", "mnist10k", "fashion-mnist", "cifar10"):
        for norm in ("linf",):
            e = default_aa_eps(name, EvalSettings(norm=norm))
            assert min(abs(e - g) for g in default_grid(name)) < 1e-12, (name, e)
    assert default_aa_eps("cifar10", EvalSettings()) == pytest.approx(8 / 255)


def test_list_prints_whole_first_sentences_without_rest_markup(capsys: pytest.CaptureFixture[str]) -> None:
    from gradreg import attacks, penalties

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "`" not in out
    line = next(li for li in out.splitlines() if li.strip().startswith("pgd-at "))
    assert line.rstrip().endswith(".")  # the whole sentence, not its first line
    assert "pgd" in attacks.ATTACKS.names() and "pgd-at" in penalties.PENALTIES.names()


# ----- 6. the plain path when the first-order kernels are off --------------------------------------
def test_penalty_fast_paths_pass_with_the_kernels_off() -> None:
    """The penalty tests' fast path, run with the first-order kernels switched off (as after a
    failed self-check under another torch): tests/conftest.py honours GRADREG_TEST_NO_KERNELS=1
    and fails any test that reaches the kernels."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "GRADREG_TEST_NO_KERNELS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",  # one process: its counts
                           str(ROOT / "tests" / "test_penalties_registry.py"), "-k", "fast_paths or plain"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = next(line for line in proc.stdout.splitlines() if "first-order kernels off" in line)
    tests, blocks = (int(w) for w in summary.split(":")[-1].replace(",", " ").split() if w.isdigit())
    assert tests >= 40 and blocks >= 10, summary  # the fast paths ran, through the plain branch
