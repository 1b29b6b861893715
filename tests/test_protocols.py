"""Evaluation protocols (gradreg.protocols): masking checks, transfer matrix, decay length, CLI reports."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradreg import ThreatModel, stats
from gradreg.analysis import decay_length, softmax_along_line
from gradreg.cli import main
from gradreg.config import TrainConfig
from gradreg.judge import evaluate_attack
from gradreg.protocols import (
    EvalSettings,
    ModelEval,
    cached_evaluation,
    default_grid,
    evaluate_model,
    masking_checks,
    rising,
    transfer_matrix,
)
from gradreg.trainer import train


class Rounded(nn.Module):
    """A planted gradient-masking model: the input is quantized before the network, so the
    input gradient is zero everywhere and gradient attacks cannot move."""

    def __init__(self, inner: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * self.levels) / self.levels)


class OffDataMask(nn.Module):
    """A planted gradient-masking model whose *raw* PGD curve rises with ε: an input farther
    than ``radius`` (ℓ∞) from every stored clean input gets a constant, confident answer — the
    stored label of the nearest one — so the gradient vanishes there (as for a defence that
    "purifies" off-data inputs). PGD in a small ball works on the inner network; in a large ball
    its random start already lands in the flat region and never leaves it, so attacking a
    larger ball succeeds *less*."""

    def __init__(self, inner: nn.Module, anchors: torch.Tensor, labels: torch.Tensor, radius: float) -> None:
        super().__init__()
        self.inner, self.radius = inner, radius
        self.register_buffer("anchors", anchors.flatten(1))  # (M, d)
        self.register_buffer("labels", labels)  # (M,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist = (x.flatten(1)[:, None, :] - self.anchors[None]).abs().amax(dim=2)  # (N, M) ℓ∞ distances
        nearest, idx = dist.min(dim=1)  # (N,)
        canned = 10.0 * F.one_hot(self.labels[idx], 10).to(x.dtype)  # (N, 10), constant in x
        return torch.where((nearest > self.radius)[:, None], canned, self.inner(x))


SETTINGS = EvalSettings(attacks=("fgsm", "pgd", "uniform"), pgd_steps=10, n_test=120, deepfool=False)


def test_default_grids_follow_the_sgr_paper() -> None:
    assert default_grid("digits")[-1] == pytest.approx(32 / 255) and default_grid("digits")[0] == 0
    assert default_grid("cifar10")[-1] == pytest.approx(8 / 255) and len(default_grid("cifar10")) == 9


def test_masking_checks_quiet_on_a_normal_model(digits_cw: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    ev = evaluate_model(digits_cw, digits, SETTINGS, name="cw")
    assert ev.unbounded is not None and ev.unbounded <= 0.02
    assert all(c.passed for c in ev.checks), [c for c in ev.checks if not c.passed]
    assert ev.curves["pgd"][0] == pytest.approx(ev.clean)  # ε = 0 is clean accuracy
    assert ev.curves["pgd"][-1] < ev.clean
    # the raw curve (every ε attacked afresh) exists, falls, and is within noise of the reported one
    raw = ev.raw_curves["pgd"]
    assert len(raw) == len(ev.eps) and raw[0] == pytest.approx(ev.clean) and not rising(ev.eps, raw, 0.0)
    assert all(r >= c - 1e-12 and r <= c + 0.02 for r, c in zip(raw, ev.curves["pgd"]))


def test_masking_checks_fire_on_a_rounding_model(digits_cw: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    masked = Rounded(digits_cw).eval()
    ev = evaluate_model(masked, digits, SETTINGS, name="rounded")
    failed = {c.name for c in ev.checks if not c.passed}
    assert "unbounded PGD reaches 0%" in failed


def test_raw_pgd_check_fires_when_a_larger_ball_succeeds_less(digits_cw: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    n = SETTINGS.n_test
    masked = OffDataMask(digits_cw, digits.test_x[:n], digits.test_y[:n], radius=10 / 255).eval()
    ev = evaluate_model(masked, digits, SETTINGS, name="off-data mask")
    raw, cumulative = ev.raw_curves["pgd"], ev.curves["pgd"]
    grid = ev.eps  # [0, 4, 8, …, 32]/255: PGD works up to 8/255 and fails from 12/255 on
    assert raw[2] < ev.clean - 0.03 and raw[-1] == pytest.approx(ev.clean)  # rises back to clean accuracy
    assert cumulative[-1] == pytest.approx(cumulative[2])  # carry-over hides it: the reported curve is flat
    check = next(c for c in ev.checks if c.name == "accuracy falls with ε")
    assert not check.passed and "raw pgd" in check.detail and f"{grid[3]:.4g}" in check.detail
    # without the raw curve the check has no teeth on this model
    no_raw = evaluate_model(masked, digits, EvalSettings(**{**SETTINGS.__dict__, "raw_pgd": False}))
    assert not no_raw.raw_curves
    assert next(c for c in no_raw.checks if c.name == "accuracy falls with ε").passed


def test_rising_compares_with_the_running_minimum() -> None:
    eps = [0.0, 0.1, 0.2, 0.3, 0.4]
    assert rising(eps, [0.9, 0.8, 0.81, 0.7, 0.7], 0.02) == []
    assert rising(eps, [0.9, 0.5, 0.515, 0.53, 0.545], 0.02) == [3, 4]  # a slow climb of small steps
    assert rising(list(reversed(eps)), [0.7, 0.7, 0.81, 0.8, 0.9], 0.02) == []  # order of ε, not of the list
    ev = ModelEval(name="m", eps=eps, clean=0.9, curves={"pgd": [0.9, 0.8, 0.7, 0.6, 0.5]},
                   raw_curves={"pgd": [0.9, 0.5, 0.9, 0.9, 0.9]})
    check = masking_checks(ev)[0]
    assert not check.passed and "raw pgd (every ε attacked afresh) at ε=0.2, 0.3, 0.4 (90.0% > 50.0%" in check.detail


def test_evaluate_attack_without_carry_over_keeps_the_raw_judgement(digits_cw: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits.test_x[:60], digits.test_y[:60]
    attack = EvalSettings(pgd_steps=5).make_attack("pgd")
    eps = [0.0, 0.05, 0.1]
    rep = evaluate_attack(digits_cw, x, y, attack, ThreatModel("linf", 0, (0, 1)), eps, carry_over=False)
    assert rep.raw_robust is not None and rep.raw_robust.shape == (3, 60)
    cumulative = torch.cummin(rep.raw_robust.int(), dim=0).values.bool()  # robust at ε only if at every ε' ≤ ε
    assert torch.equal(rep.robust, cumulative)
    assert rep.raw_accuracy[0] == rep.robust_accuracy[0] == rep.clean_accuracy


def test_transfer_diagonal_equals_white_box(digits_cw: nn.Module, digits_mlp: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    settings = EvalSettings(pgd_steps=5, n_test=80, eps=[0.0, 0.05, 0.1])
    matrix = transfer_matrix({"cw": digits_cw, "mlp": digits_mlp}, digits, settings)
    x, y = digits.test_x[:80], digits.test_y[:80]
    # the same examples crafted and judged through evaluate_attack's own transfer path
    white = evaluate_attack(digits_mlp, x, y, settings.make_attack("pgd"), ThreatModel("linf", 0, (0, 1)),
                            settings.eps, batch_size=settings.batch_size, source_model=digits_mlp).robust_accuracy
    assert matrix["mlp"]["mlp"] == pytest.approx(white)
    # transferred examples are weaker than white-box ones on the same target
    assert sum(matrix["cw"]["mlp"]) >= sum(matrix["mlp"]["mlp"]) - 0.05


def test_decay_length_of_an_exponential() -> None:
    zeta = 3.0
    values = [math.exp(-r / zeta) for r in range(12)]
    assert decay_length(values) == pytest.approx(zeta, abs=0.05)
    assert decay_length([1.0, 0.9, 0.8]) is None


def test_softmax_line_ends_at_the_two_points(digits_cw: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    x = digits.test_x[:3]
    x_adv = (x + 0.1).clamp(0, 1)
    probs = softmax_along_line(digits_cw, x, x_adv, points=5)
    assert probs.shape == (5, 3, 10)
    assert torch.allclose(probs[0], torch.softmax(digits_cw(x), 1), atol=1e-6)
    assert torch.allclose(probs[-1], torch.softmax(digits_cw(x_adv), 1), atol=1e-6)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    out = []
    for name, method, lam in (("clean", "clean", None), ("gn", "gn", 1.0)):
        cfg = TrainConfig(data="digits", model="cw", epochs=6, batch_size=64, method=method, lam=lam, quiet=True,
                          out=str(root / name))
        train(cfg, log=lambda s: None)
        out.append(root / name)
    return out


def test_eval_transfer_lrc_analyze_commands_write_reports(two_runs: list[Path], tmp_path: Path) -> None:
    runs = [str(p) for p in two_runs]
    common = ["--n-test", "60", "--steps", "5"]
    assert main(["eval", *runs, "--out", str(tmp_path / "ev"), *common, "--eps", "0", "8/255", "16/255"]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [r["name"] for r in res["runs"]] == ["clean", "gn"]
    assert res["runs"][0]["eps"] == pytest.approx([0, 8 / 255, 16 / 255])
    for f in ("report.md", "summary.csv", "accuracy_per_eps.csv", "accuracy_pgd.png"):
        assert (tmp_path / "ev" / f).is_file(), f
    assert main(["transfer", *runs, "--out", str(tmp_path / "tr"), *common, "--eps", "0", "0.1"]) == 0
    tr = json.loads((tmp_path / "tr" / "results.json").read_text())
    assert set(tr["matrix"]) == {"clean", "gn"} and (tmp_path / "tr" / "transfer.png").is_file()
    assert main(["lrc", *runs, "--out", str(tmp_path / "lrc"), "--n-test", "40", "--samples", "5",
                 "--zeta", "1", "4", "--eps", "0", "0.3", "--scale", "unit"]) == 0
    assert (tmp_path / "lrc" / "lrc_eps1.png").is_file()
    unit = json.loads((tmp_path / "lrc" / "results.json").read_text())
    assert main(["lrc", runs[0], "--out", str(tmp_path / "lrc-data"), "--n-test", "40", "--samples", "5",
                 "--zeta", "1", "4", "--eps", "0", "0.3", "--scale", "data"]) == 0
    scaled = json.loads((tmp_path / "lrc-data" / "results.json").read_text())
    assert unit["scale"] == "unit" and scaled["scale"] == "data"
    assert "σ_data" in (tmp_path / "lrc-data" / "report.md").read_text()
    # σ_data < 1 on [0, 1] images: weaker noise than s = 1, so at ε = 0.3 no worse accuracy
    assert all(scaled["results"]["clean"][z][1] >= unit["results"]["clean"][z][1] for z in ("1.0", "4.0"))
    assert scaled["results"]["clean"] != unit["results"]["clean"]  # the scale reached the noise
    assert main(["analyze", runs[0], "--out", str(tmp_path / "an"), *common]) == 0
    an = json.loads((tmp_path / "an" / "results.json").read_text())
    assert len(an["perturbation"]) == len(an["data"]) and an["data"][0] > 0
    assert (tmp_path / "an" / "covariance.png").is_file() and (tmp_path / "an" / "smoothness.png").is_file()


# AutoAttack kept cheap: Square (gradient-free, so quantization cannot hide from it) with a few
# queries beside APGD-CE with a few iterations, on 40 points
AA_CHEAP = {"attacks": ["apgd-ce", "square"], "n_iter": 5, "n_queries": 100}
AA_SETTINGS = EvalSettings(attacks=("pgd",), pgd_steps=10, n_test=40, deepfool=False, unbounded_check=False,
                           autoattack=True, aa_version="custom", aa_params=AA_CHEAP)


def test_autoattack_check_fires_on_a_masked_model_and_not_on_a_normal_one(digits_cw: nn.Module, digits,  # type: ignore[no-untyped-def]
                                                                           tmp_path: Path) -> None:
    masked = evaluate_model(Rounded(digits_cw).eval(), digits, AA_SETTINGS, name="rounded")
    normal = evaluate_model(digits_cw, digits, AA_SETTINGS, name="cw")
    for ev in (masked, normal):
        assert ev.autoattack is not None and [a["eps"] for a in ev.autoattack] == [0.3]  # digits' standard ε
        entry = ev.autoattack[0]
        assert entry["n"] == 40 and entry["run"]["package"] in ("autoattack", "pyautoattack")
        assert entry["run"]["attacks"] == ["apgd-ce", "square"] and entry["run"]["seed"] == 0
        assert entry["interval"]["lo"] <= entry["accuracy"] <= entry["interval"]["hi"]
    aa_check = {ev.name: next(c for c in ev.checks if c.name == "AutoAttack close to PGD") for ev in (masked, normal)}
    assert masked.autoattack[0]["pgd"] > 0.5 and masked.autoattack[0]["accuracy"] < 0.2  # PGD is fooled
    assert not aa_check["rounded"].passed and aa_check["cw"].passed
    assert masked.autoattack[0]["paired"]["significant"]
    # the eval report puts AutoAttack beside PGD at the same ε, every accuracy with n and interval
    from gradreg.commands.eval import write_eval_report

    write_eval_report(tmp_path, [masked, normal], data="digits", settings_desc="test")
    report = (tmp_path / "report.md").read_text()
    assert "| run | n | clean | PGD (avg) | PGD ε=0.3 | AutoAttack ε=0.3 |" in report
    iv = stats.proportion(masked.aa_flags[0.3])
    assert f"| rounded | 40 |" in report and iv.text() in report and "⚠" in report
    assert "rounded at ε=0.3: AutoAttack: " in report and "first 40 test points; " in report  # the shared wording
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("run,n,clean,clean_lo,clean_hi,pgd_avg,pgd_avg_lo,pgd_avg_hi,pgd_eps0.3")
    res = json.loads(json.dumps(masked.to_dict()))
    assert res["autoattack"][0]["interval"]["n"] == 40 and len(res["outcomes"]["autoattack"]["0.3"]) == 40
    assert res["intervals"]["clean"]["n"] == 40 and (tmp_path / "accuracy_pgd.png").is_file()


def test_autoattack_is_built_once_and_resumes_finished_batches(digits_cw: nn.Module, digits, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from gradreg.attacks.autoattack import AutoAttack

    settings = EvalSettings(**{**AA_SETTINGS.__dict__, "batch_size": 10, "n_test": 30, "aa_cache": str(tmp_path),
                               "aa_params": {"attacks": ["apgd-ce"], "n_iter": 3}})
    built, calls = [], []
    make = settings.make_autoattack
    monkeypatch.setattr(EvalSettings, "make_autoattack", lambda self: built.append(make()) or built[-1])
    first = evaluate_model(digits_cw, digits, settings, name="cw")
    assert len(built) == 1 and built[0].built == 1  # one package object for 3 batches
    cache = next(tmp_path.glob("autoattack-cw-*.json"))
    saved = json.loads(cache.read_text())
    assert sorted(saved["batches"]) == ["0", "10", "20"]
    # an interrupted run: drop the last batch; the re-run attacks only that one
    del saved["batches"]["20"]
    cache.write_text(json.dumps(saved))
    original = AutoAttack._perturb
    monkeypatch.setattr(AutoAttack, "_perturb", lambda self, *a: calls.append(len(a[1])) or original(self, *a))
    again = evaluate_model(digits_cw, digits, settings, name="cw")
    assert len(calls) == 1 and calls[0] <= 10  # one batch (less its clean mistakes) attacked again
    assert again.autoattack[0]["accuracy"] == first.autoattack[0]["accuracy"]


def test_a_finished_evaluation_is_read_back_not_recomputed(digits_cw: nn.Module, digits_mlp: nn.Module, digits,  # type: ignore[no-untyped-def]
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gradreg.protocols as protocols

    settings = EvalSettings(attacks=("pgd", "uniform"), pgd_steps=3, n_test=40, deepfool=True)
    cache = tmp_path / "cw.json"
    first, reused = cached_evaluation(digits_cw, digits, settings, cache=cache, name="cw")
    assert not reused and cache.is_file()
    runs: list[str] = []
    original = protocols.evaluate_model
    monkeypatch.setattr(protocols, "evaluate_model", lambda *a, **k: runs.append(k["name"]) or original(*a, **k))
    again, reused = cached_evaluation(digits_cw, digits, settings, cache=cache, name="cw")
    assert reused and runs == []
    # everything a report reads survives the round trip: accuracies, outcomes, intervals, checks
    assert again.to_dict() == json.loads(json.dumps(first.to_dict()))
    assert torch.equal(again.flags["pgd"], first.flags["pgd"]) and torch.equal(again.clean_flags, first.clean_flags)
    assert again.average_interval("pgd") == first.average_interval("pgd")
    # another model, other settings or a torn file: attacked again, never a stale answer
    _, reused = cached_evaluation(digits_mlp, digits, settings, cache=cache, name="cw")
    assert not reused and runs == ["cw"]
    stronger = EvalSettings(**{**settings.__dict__, "pgd_steps": 5})
    _, reused = cached_evaluation(digits_mlp, digits, stronger, cache=cache, name="cw")
    assert not reused and len(runs) == 2
    cache.write_text(cache.read_text()[:50])
    _, reused = cached_evaluation(digits_mlp, digits, stronger, cache=cache, name="cw")
    assert not reused and len(runs) == 3


def test_autoattack_after_pgd_runs_only_on_pgd_survivors_and_square_still_catches_masking(  # type: ignore[no-untyped-def]
        digits_cw: nn.Module, digits, monkeypatch: pytest.MonkeyPatch) -> None:
    """``aa_after_pgd``: AutoAttack sees only the points PGD left standing, a point PGD broke is
    broken in its column, Square audits only what both left standing, and the planted masked
    model is still caught by the gradient-free audit while the normal one is not."""
    import gradreg.protocols.masking as masking
    import gradreg.protocols.robustness as robustness
    from gradreg.protocols.caching import evaluation_key
    from gradreg.protocols.settings import unbits

    settings = EvalSettings(**{**AA_SETTINGS.__dict__, "aa_params": {"attacks": ["apgd-ce"], "n_iter": 5},
                               "aa_after_pgd": True, "square_n": 40, "square_queries": 200})
    seen: list[int] = []
    square_seen: list[int] = []
    original, original_square = robustness.resumable_flags, masking.sharded_outcomes
    monkeypatch.setattr(robustness, "resumable_flags", lambda m, x, y, *a, **k: seen.append(len(y)) or original(m, x, y, *a, **k))
    monkeypatch.setattr(masking, "sharded_outcomes",
                        lambda m, x, y, *a, **k: square_seen.append(len(y)) or original_square(m, x, y, *a, **k))
    results = {}
    for name, model in (("rounded", Rounded(digits_cw).eval()), ("cw", digits_cw)):
        seen.clear(), square_seen.clear()
        ev = evaluate_model(model, digits, settings, name=name)
        entry = ev.autoattack[0]
        pgd = unbits(entry["pgd_bits"])  # PGD at the AutoAttack ε on the same 40 points
        aa = ev.aa_flags[0.3]
        assert seen == ([int(pgd.sum())] if int(pgd.sum()) else [])  # AutoAttack ran on the PGD survivors only
        assert not bool((aa & ~pgd).any())  # a point PGD broke is broken in the AutoAttack column
        assert entry["run"]["after_pgd"] and entry["square"]["after_gradient"]
        assert entry["square"]["audited"] == int((pgd & aa).sum()) == sum(square_seen)
        results[name] = next(c for c in ev.checks if c.name.startswith("gradient-free"))
    assert results["rounded"].passed is False and results["cw"].passed is True
    assert "run on the" in results["rounded"].detail
    # at its default the setting stays out of the evaluation key (earlier evaluations are reused)
    plain = EvalSettings(**{**settings.__dict__, "aa_after_pgd": False})
    assert "aa_after_pgd" not in evaluation_key(digits_cw, digits, plain, "cw")["settings"]
    assert evaluation_key(digits_cw, digits, settings, "cw")["settings"]["aa_after_pgd"] is True
