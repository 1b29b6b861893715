"""Models from anywhere: a user's module + weights file, evaluated through the CLI, equal to
the Python API on the same inputs; RobustBench-layout architectures and checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from byo_nets import small_bn_net
from gradreg import attacks, data, loading, models
from gradreg.cli import main
from gradreg.judge import evaluate_attack
from gradreg.threat import ThreatModel

N = 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """The user's BN net trained briefly with a plain loop, saved as .pt (nested, with
    DataParallel prefixes) and as .safetensors."""
    bundle = data.load("digits")
    torch.manual_seed(0)
    model = small_bn_net(width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for i in range(0, len(bundle.train_y), 64):
            opt.zero_grad()
            F.cross_entropy(model(bundle.train_x[i:i + 64]), bundle.train_y[i:i + 64]).backward()
            opt.step()
    model.eval()
    tmp = tmp_path_factory.mktemp("byo")
    state = model.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp / "net.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "net.safetensors"))
    return model, tmp


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_cli_pgd_equals_python_api(trained: tuple[torch.nn.Module, Path], suffix: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    model, folder = trained
    out = tmp_path / "pgd.json"
    code = main(["attack", "--model", "byo_nets:small_bn_net", "--model-param", "width=8",
                 "--weights", str(folder / f"net{suffix}"), "--data", "digits", "--attack", "pgd",
                 "--eps", "0.1", "--steps", "5", "--seed", "3", "--limit", str(N), "--labels", "true",
                 "--json", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    cli = json.loads(out.read_text())
    bundle = data.load("digits")
    pgd = attacks.make("pgd", steps=5, seed=3, labels="true")
    report = evaluate_attack(model, bundle.test_x[:N], bundle.test_y[:N], pgd, ThreatModel("linf", 0.0, (0.0, 1.0)),
                             [0.1])
    assert cli["results"][0]["accuracy"] == report.robust_accuracy[0]
    assert cli["clean_accuracy"] == report.clean_accuracy
    assert 0 < report.robust_accuracy[0] < report.clean_accuracy  # the attack did something


def test_eval_command_takes_model(trained: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, folder = trained
    code = main(["eval", "--model", "byo_nets:small_bn_net", "--weights", str(folder / "net.safetensors"),
                 "--data", "digits", "--out", str(tmp_path / "e"), "--eps", "0", "0.1", "--steps", "3",
                 "--n-test", "40", "--attacks", "pgd", "--no-deepfool", "--input-shape", "1,8,8",
                 "--num-classes", "10", "--bounds", "0,1"])
    assert code == 0
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["runs"][0]["name"] == "net"


def test_state_dict_nesting_and_prefixes(tmp_path: Path) -> None:
    model = small_bn_net(width=4)
    state = model.state_dict()
    for i, wrapped in enumerate([{"model": state}, {"net": {f"module.{k}": v for k, v in state.items()}},
                                 {f"_orig_mod.{k}": v for k, v in state.items()}]):
        torch.save(wrapped, tmp_path / f"w{i}.pth")
        got = loading.read_state_dict(tmp_path / f"w{i}.pth")
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) for k in state)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": small_bn_net(width=4)}, tmp_path / "module.pt")  # a pickled nn.Module
    with pytest.raises(loading.LoadError, match="holds pickled Python objects") as info:
        loading.read_state_dict(tmp_path / "module.pt")
    assert "\x1b[" not in str(info.value) and str(info.value).endswith("--model")  # whole, no colour codes
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(loading.LoadError, match="cannot be loaded as plain weights"):
        loading.read_state_dict(tmp_path / "junk.pt")


BAD = [
    (["--model", "no_such_module:f", "--weights", "{w}", "--data", "digits"], "cannot import 'no_such_module'"),
    (["--model", "byo_nets:nope", "--weights", "{w}", "--data", "digits"], "has no attribute 'nope'"),
    (["--model", "byo_nets", "--weights", "{w}", "--data", "digits"], "unknown model 'byo_nets'"),
    (["--model", "byo_nets:small_bn_net", "--weights", "/nonexistent.pt", "--data", "digits"], "does not exist"),
    (["--model", "byo_nets:small_bn_net", "--model-param", "width=5", "--weights", "{w}", "--data", "digits"],
     "do not fit the model"),
    (["--model", "byo_nets:small_bn_net", "--model-param", "colour=1", "--weights", "{w}", "--data", "digits"],
     "cannot build byo_nets:small_bn_net"),
    (["--model", "byo_nets:small_bn_net", "--weights", "{w}"], "--model needs --data"),
    (["--model", "byo_nets:small_bn_net", "--data", "digits"], "needs --weights"),
    (["--model", "byo_nets:small_bn_net", "--weights", "{w}", "--data", "nope.npz"], "neither a registered data set"),
    (["--model", "byo_nets:small_bn_net", "--weights", "{w}", "--data", "digits", "--input-shape", "3,32"],
     "--input-shape expects three"),
    (["--model", "byo_nets:small_bn_net", "--weights", "{w}", "--data", "digits", "--input-shape", "3,32,32"],
     "--input-shape says (3, 32, 32)"),
    (["--model", "byo_nets:small_bn_net", "--weights", "{w}", "--data", "digits", "--bounds", "1,0"], "LO < HI"),
    (["--model", "byo_nets:small_bn_net", "--weights", "{w}", "--data", "digits", "--bounds", "0.2,0.5"],
     "outside the data set's bounds"),
    (["--weights", "{w}"], "--model is missing"),
    (["--model", "robustbench:Nope2020", "--model-dir", "/nonexistent"], "Nope2020"),
    (["--model", "byo_nets:small_bn_net", "--weights", "{w}", "--data", "digits", "--device", "cuda:7"],
     "device 'cuda:7'"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_model_arguments(argv: list[str], message: str, trained: tuple[torch.nn.Module, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    w = str(trained[1] / "net.pt")
    args = [a.replace("{w}", w) for a in argv]
    for command in (["attack", "--eps", "0.1", "--limit", "5"], ["eval", "--out", str(tmp_path / "e"), "--eps", "0.1"]):
        code = main(command + args)
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and message in err, err


# ----- architectures ------------------------------------------------------------------------
def _rb_wrn_keys(depth: int, sub_block1: bool) -> set[str]:
    """RobustBench's WideResNet parameter names, written out from its layout (independent of
    gradreg's module tree)."""
    n = (depth - 4) // 6
    keys = {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
            "bn1.num_batches_tracked", "fc.weight", "fc.bias"}
    blocks = ["block1", "block2", "block3"] + (["sub_block1"] if sub_block1 else [])
    for b in blocks:
        for i in range(n):
            p = f"{b}.layer.{i}"
            for bn in ("bn1", "bn2"):
                keys |= {f"{p}.{bn}.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                                    "num_batches_tracked")}
            keys |= {f"{p}.conv1.weight", f"{p}.conv2.weight"}
            if i == 0 and b != "block1" and b != "sub_block1":
                keys.add(f"{p}.convShortcut.weight")
    return keys


@pytest.mark.parametrize("depth,sub", [(10, False), (16, True)])
def test_wrn_key_layout_matches_robustbench(depth: int, sub: bool) -> None:
    # widen_factor 1 makes block1 (16 → 16) keep its width, as in RobustBench's WRN-d-1
    model = models.make("wrn", depth=depth, widen_factor=1, sub_block1=sub)
    assert set(model.state_dict()) - {"mu", "sigma"} == _rb_wrn_keys(depth, sub)
    wide = models.make("wrn", depth=10, widen_factor=2)
    assert "block1.layer.0.convShortcut.weight" in wide.state_dict()  # 16 → 32 changes width
    assert models.make("wrn-34-10", depth=10, widen_factor=1)(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_preact_key_layout_matches_robustbench() -> None:
    keys = set(models.make("preact-resnet18", width=4).state_dict()) - {"mu", "sigma"}
    assert "conv1.weight" in keys and "linear.weight" in keys and "linear.bias" in keys
    for stage in (2, 3, 4):
        assert f"layer{stage}.0.shortcut.0.weight" in keys
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)
    assert len([k for k in keys if k.endswith("conv1.weight") or k.endswith("conv2.weight")]) == 1 + 16


def test_robustbench_layout_checkpoint_loads_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A random-weight PreAct ResNet-18 saved the way RobustBench stores checkpoints
    (model_dir/cifar10/Linf/NAME.pt, DataParallel prefixes, no mu/sigma) loads by id."""
    import sys

    monkeypatch.setitem(sys.modules, "robustbench", None)  # the local-file path, package or not
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    torch.manual_seed(0)
    src = models.make("preact-resnet18")
    state = {f"module.{k}": v for k, v in src.state_dict().items() if k not in ("mu", "sigma")}
    path = loading.robustbench_path("Wong2020Fast", model_dir=tmp_path, dataset="cifar10", threat_model="Linf")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    model = loading.robustbench_model("Wong2020Fast", model_dir=tmp_path)
    assert torch.allclose(model.mu.flatten(), torch.tensor(loading.CIFAR10_MEAN))
    x = torch.rand(4, 3, 32, 32)
    src.eval()
    with torch.no_grad():  # the same weights, with Wong et al.'s normalization in front
        want = src.linear(src.features((x - model.mu) / model.sigma))
        assert torch.allclose(model(x), want, atol=1e-5)
    xs = torch.rand(12, 3, 32, 32)
    ys = torch.arange(12) % 10
    save_file({"x_train": xs, "y_train": ys, "x_test": xs.clone(), "y_test": ys.clone()},
              str(tmp_path / "tiny.safetensors"))
    code = main(["attack", "--model", "robustbench:Wong2020Fast", "--model-dir", str(tmp_path), "--data",
                 str(tmp_path / "tiny.safetensors"), "--eps", "8/255", "--steps", "2", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err


def test_robustbench_package_path() -> None:
    pytest.importorskip("robustbench")
    with pytest.raises(loading.LoadError):  # no network, no file: one-line error, not a traceback
        loading.robustbench_model("Standard", model_dir="/nonexistent-dir")


@pytest.mark.parametrize("command", [
    ["transfer", "{run}", "--eps", "0", "0.1", "--steps", "2", "--n-test", "20"],
    ["lrc", "--zeta", "2", "--eps", "0", "0.1", "--samples", "2", "--n-test", "20"],
    ["analyze", "--eps", "0", "0.1", "--steps", "2", "--n-test", "20", "--examples", "2"],
])
def test_other_commands_take_model(command: list[str], trained: tuple[torch.nn.Module, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from gradreg.config import TrainConfig
    from gradreg.trainer import train

    run = tmp_path / "run"
    if "{run}" in command:
        train(TrainConfig(data="digits", model="mlp", epochs=1, quiet=True, out=str(run),
                          model_params={"hidden": [8]}), log=lambda s: None)
    argv = [a.replace("{run}", str(run)) for a in command]
    code = main([*argv, "--model", "byo_nets:small_bn_net", "--weights", str(trained[1] / "net.pt"), "--data",
                 "digits", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["record"]["command"].startswith(f"gradreg {command[0]} --") or command[0] == "transfer"
    if command[0] == "transfer":
        assert set(res["matrix"]) == {"run", "net"}
