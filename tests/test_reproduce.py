"""The tiny reproduction and the demo run end to end (slow: a few minutes on 2 cores)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gradreg import experiments, penalties
from gradreg.cli import main
from gradreg.penalties import noise_aug  # noqa: F401  (registers "lrc-aug" until penalties/__init__ imports it)
from gradreg.tables import LRC_DATA_COLUMN, lrc_column


def test_experiments_load_and_name_registered_methods() -> None:
    for name in experiments.names():
        exp = experiments.load(name).for_budget("tiny")  # "$eps" values take the budget's ε
        assert "tiny" in exp.budgets
        for row in exp.rows:
            penalties.make(row.method, **row.penalty)  # every row builds
        for paper_row, numbers in exp.paper.items():
            assert paper_row in {r.name for r in exp.rows}
            assert len(numbers) == len(exp.columns)
        for row in exp.rows:  # every adversarial-training row says which variant it runs
            if row.method in ("fgsm-at", "pgd-at"):
                assert row.note, f"{name}: row {row.name!r} ({row.method}) has no note"
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.load("nope")


@pytest.mark.slow
def test_sgr_mnist_reproduction_has_every_row_column_and_plot(fast_sgr_mnist: None, tmp_path: Path) -> None:
    """Every row of the experiment, with twins, AutoAttack and the cost column, end to end on
    the fast budget (1 epoch, 20 test points): what the table holds, not how robust it is (the
    test below checks that on the real tiny budget)."""
    assert main(["reproduce", "sgr-mnist", "--budget", "tiny", "--out", str(tmp_path)]) == 0
    exp = experiments.load("sgr-mnist")
    result = json.loads((tmp_path / "results.json").read_text())
    assert list(result["rows"]) == [r.name for r in exp.rows]
    for name, row in result["rows"].items():
        assert list(row["cells"]) == exp.columns
        assert all(v is not None for v in row["cells"].values()), name
        assert row["step_cost"] is not None, name
    report = (tmp_path / "report.md").read_text()
    assert "scikit-learn digits" in report and "(99.4)" in report  # paper numbers beside ours
    # every row is in the table, a row with another row's objective as that row's alias, once
    assert result["aliases"] == {"DataGrad-L1": ["Lyu (ℓ∞)"]}
    assert "| DataGrad-L1 (≡ Lyu (ℓ∞)) |" in report and "| Lyu (ℓ∞) |" not in report
    for r in exp.rows:
        assert r.name == "Lyu (ℓ∞)" or f"| {r.name} " in report, r.name
    assert (tmp_path / "pgd.png").is_file() and (tmp_path / "transfer.png").is_file()


@pytest.mark.slow
def test_tiny_budget_gn_and_sgr_are_more_robust_than_clean(tmp_path: Path) -> None:
    """The experiment's clean, GN and SGR rows trained on its tiny budget (digits, 12 epochs):
    under PGD at the training ε both regularized models keep more of the 360 test points than
    the clean one, by an exact McNemar test on the same points (not by eye)."""
    import gradreg
    from gradreg import stats
    from gradreg.reproduce import row_config
    from gradreg.runs import load_run
    from gradreg.trainer import train

    exp = experiments.load("sgr-mnist")
    budget = exp.budget("tiny")
    bundle = gradreg.data.load("digits")
    threat = gradreg.ThreatModel("linf", 0.1, bundle.bounds)
    robust = {}
    for row in (r for r in exp.rows if r.name in ("clean", "GN", "SGR")):
        cfg = row_config(exp, row, budget, tmp_path, None)
        train(cfg, log=lambda _: None)
        model = load_run(cfg.out, device="cpu").model
        res = gradreg.evaluate(model, bundle.test_x, bundle.test_y, threat, attacks=["pgd"], steps=10)
        robust[row.name] = res.outcomes["pgd"][0]
    for name in ("GN", "SGR"):
        cmp = stats.compare(robust[name], robust["clean"], a=name, b="clean")
        assert cmp.diff > 0 and cmp.significant, cmp


def test_lrc_columns_parse_and_the_experiment_declares_them() -> None:
    assert lrc_column("LRC ζ=4") == 4.0 and lrc_column("LRC ζ=0.5") == 0.5
    assert lrc_column(LRC_DATA_COLUMN) == "data" and lrc_column("PGD") is None and lrc_column("LRC ζ=") is None
    exp = experiments.load("lrc-cifar10")
    assert [r.name for r in exp.rows] == ["clean", "GN", "SGR", "LRC-augmented"]
    sgr = {r.name: r for r in experiments.load("sgr-cifar10").rows}
    # the same rows as sgr-cifar10 (rows_from), GN's and SGR's λ grids added by [tune]
    assert all(replace(r, lams=[]) == sgr[r.name] for r in exp.rows[:3])
    assert exp.tune["attack"] == "lrc" and exp.tune["lrc_zeta"] == 8
    assert {r.name: r.lams for r in exp.rows if r.lams} == {"GN": [0.1, 1.0, 10.0], "SGR": [0.1, 1.0, 10.0]}
    assert exp.lrc["eps"] == 0.3 and exp.budget("tiny")["data"] == "digits"
    assert exp.budget("paper")["data"] == "cifar10"
    assert [lrc_column(c) for c in exp.columns[2:]] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert exp.paper["LRC-augmented"][:2] == [None, 57.9]  # nan in the file: not reported


def test_tiny_lrc_cifar10_reproduction(tmp_path: Path) -> None:
    """End to end on digits in well under a minute (4 rows, worst-of-10, 200 test points)."""
    assert main(["reproduce", "lrc-cifar10", "--budget", "tiny", "--out", str(tmp_path)]) == 0
    exp = experiments.load("lrc-cifar10")
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["data"] == "digits" and result["lrc"]["samples"] == 10
    assert list(result["rows"]) == ["clean", "GN", "SGR", "LRC-augmented"]
    for name, row in result["rows"].items():
        assert list(row["cells"]) == exp.columns
        assert all(v is not None and 0 <= v <= 1 for v in row["cells"].values()), name
    report = (tmp_path / "report.md").read_text()
    assert "scikit-learn digits" in report and "CIFAR-10" in report
    assert "| method | test | LRC Σ=data | LRC ζ=1 | LRC ζ=2 | LRC ζ=4 | LRC ζ=8 | LRC ζ=16 |" in report
    for r in exp.rows:
        assert f"| {r.name} |" in report
    for number in ("(46.5)", "(48.7)", "(65.8)", "(57.9)", "(84.7)"):  # paper numbers beside ours
        assert number in report, number
    assert "beside our column **LRC Σ=data**" in report and "worst-of-10" in report
    assert (tmp_path / "lrc.png").is_file()
    # GN's and SGR's λ were tuned on validation LRC noise at ζ = 8 (the paper's protocol), each
    # choice one of its grid's points, and the sweep's record says what it scored
    for slug in ("gn", "sgr"):
        record = json.loads((tmp_path / "sweeps" / slug / "sweep.json").read_text())
        base = record["spec"]["base"]
        assert base["validation_attack"] == "lrc" and base["validation_lrc_zeta_px"] == 8.0
        assert base["validation_eps"] == 0.3 and base["validation_lrc_samples"] == 10
        scores = [r["pgd_accuracy"] for r in [record["reference"], *record["rows"]]]  # the validation LRC accuracies
        assert len(scores) == 3 and all(0 <= v <= 1 for v in scores), scores  # the clean reference, λ = 0.1 and 10
        assert "LRC noise draws, ζ = 8 px" in (tmp_path / "sweeps" / slug / "sweep.md").read_text()
        name = "GN" if slug == "gn" else "SGR"
        if record["chosen"] is not None:
            assert result["lam"][name]["source"] == "sweep" and result["lam"][name]["lam"] == record["chosen"]["lam"]
        else:  # the rule picked none: the row keeps its declared λ and says so
            assert result["lam"][name]["source"].startswith("declared") and result["lam"][name]["lam"] == 1.0


def test_tune_lams_must_name_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A [tune] grid for a row the experiment does not have is refused when the file loads."""
    real = experiments.resources.files(experiments.__name__)
    text = real.joinpath("lrc-cifar10.toml").read_text().replace('"SGR" = [0.1', '"SRG" = [0.1')
    (tmp_path / "lrc-cifar10.toml").write_text(text)
    (tmp_path / "sgr-cifar10.toml").write_text(real.joinpath("sgr-cifar10.toml").read_text())
    monkeypatch.setattr(experiments.resources, "files", lambda _name: tmp_path)
    with pytest.raises(ValueError, match=r"\[tune\] lams names rows it does not have: \['SRG'\]"):
        experiments.load("lrc-cifar10")


FAST = {"data": "digits", "model": "cw", "epochs": 1, "batch_size": 64, "lr": 1e-3, "n_test": 20, "pgd_steps": 2,
        "aa_attacks": ["apgd-ce"], "aa_n_iter": 2, "aa_n": 10, "cost_rounds": 2}


@pytest.fixture
def fast_sgr_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    """sgr-mnist with a budget that trains in seconds (1 epoch, 20 test points, PGD-2)."""
    real = experiments.load

    def load(name: str) -> experiments.Experiment:
        exp = real(name)
        exp.budgets["tiny"] = dict(FAST)
        return exp

    monkeypatch.setattr(experiments, "load", load)


@pytest.mark.slow
def test_seeds_twin_transfer_intervals_and_autoattack_column(fast_sgr_mnist: None, tmp_path: Path) -> None:
    assert main(["reproduce", "sgr-mnist", "--budget", "tiny", "--out", str(tmp_path), "--rows", "clean", "FGSM-AT",
                 "--seeds", "0", "1"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["seeds"] == [0, 1] and result["transfer_twin_seeds"] == [1, 0]
    # every transfer cell is crafted on a twin: never the weights of the model it judges
    prov = result["transfer_sources"]
    assert {(p["seed"], p["source"]) for p in prov} == {(0, "clean"), (0, "FGSM-AT"), (1, "clean"), (1, "FGSM-AT")}
    for p in prov:
        assert p["source_seed"] != p["seed"]
        assert all(p["source_fingerprint"] != fp for fp in p["target_fingerprints"].values())
    for name, row in result["rows"].items():
        assert len(row["evals"]) == 2 and row["step_cost"] is not None
        for col in ("test", "PGD", "←clean", "←FGSM-AT", "PGD ε=0.1", "AA ε=0.1", "worst ε=0.1"):
            iv = row["intervals"][col]
            values = row["per_seed"][col]
            assert iv["seeds"] == 2 and iv["value"] == pytest.approx(sum(values) / 2)
            assert iv["lo"] <= iv["value"] <= iv["hi"]
        assert row["cells"]["←PGD-AT"] is None  # a source row that was not trained
    report = (tmp_path / "report.md").read_text()
    assert "| PGD | PGD ε=0.1 | AA ε=0.1 | worst ε=0.1 | T-PGD |" in report and " ± " in report
    assert "## Differences between rows" in report and "twin" in report
    assert "- **FGSM-AT**: the SGR paper's FGSM baseline" in report  # the row's variant, printed
    assert (tmp_path / "runs" / "fgsm-at-s1" / "model.safetensors").is_file()
    # --report-only rebuilds the same table, transfer columns and seeds included, from results.json
    table = (tmp_path / "table.csv").read_text()
    (tmp_path / "table.csv").unlink()
    assert main(["reproduce", "sgr-mnist", "--budget", "tiny", "--out", str(tmp_path), "--report-only"]) == 0
    assert (tmp_path / "table.csv").read_text() == table
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["differences"] == result["differences"] and again["transfer"] == result["transfer"]


def test_report_wording_follows_the_paired_test() -> None:
    from gradreg.tables import difference_lines

    n = 200
    same = torch.zeros(n, dtype=torch.float64)
    same[:150] = 1
    close = same.clone()
    close[150:153] = 1  # 3 more right: McNemar p = 0.25
    far = same.clone()
    far[150:190] = 1  # 40 more right: p ≈ 2e-12
    quiet = difference_lines("test", {"A": same, "B": close}, reference="A")
    loud = difference_lines("test", {"A": same, "B": far}, reference="A")
    assert len(quiet) == 1 and "not distinguishable at this n" in quiet[0]
    assert len(loud) == 1 and "B is more accurate than A by 20.0 points" in loud[0] and "mcnemar-exact" in loud[0]
    # several seeds: the two-level test over seeds and points decides
    seeds_far = difference_lines("PGD", {"A": torch.stack([same, same]), "B": torch.stack([far, far])}, reference="A")
    assert "more accurate" in seeds_far[0] and "two-level" in seeds_far[0]
    # one column's tests are one family: Holm-adjusted, raw and adjusted p both printed
    three = difference_lines("test", {"A": same, "B": far, "C": close}, reference="A")
    assert len(three) == 3 and all("Holm-adjusted" in line and "over 3" in line for line in three)


def test_step_cost_comes_from_interleaved_rounds_and_never_shows_more_work_as_cheaper() -> None:
    """Costs are medians of per-round ratios: a load that grows during the measurement cancels
    (sequential timing would report the load, not the work). With a clock that counts the
    models' layer calls, the measured ratio is a work ratio: PGD-AT (7 attack steps besides the
    training pass) must come out above 1× a clean step."""
    from gradreg.cost import interleaved_costs
    from gradreg.reproduce import step_costs

    clock, load = {"t": 0.0}, {"k": 1.0}

    def work(units: float):  # type: ignore[no-untyped-def]
        def run() -> None:
            clock["t"] += units * load["k"]
        return run

    def grow() -> None:  # a background load that doubles every round
        load["k"] *= 2

    costs = interleaved_costs({"clean": work(1.0), "heavy": work(3.0), "load": grow}, reference="clean", rounds=6,
                              clock=lambda: clock["t"])
    assert costs["heavy"].ratio == pytest.approx(3.0) and costs["heavy"].lo == pytest.approx(3.0)
    assert costs["clean"].ratio == 1.0
    with pytest.raises(ValueError, match="reference"):
        interleaved_costs({"a": grow}, reference="clean", rounds=1)

    exp = experiments.load("sgr-mnist")
    budget = {**FAST, "batch_size": 16}
    rows = [r for r in exp.rows if r.name in ("clean", "PGD-AT")]
    calls = {"n": 0}

    def count(module, args, output):  # type: ignore[no-untyped-def]
        if isinstance(module, torch.nn.Linear):
            calls["n"] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        real = step_costs(exp, rows, budget, Path("/tmp/unused"), None, rounds=2, clock=lambda: float(calls["n"]))
    finally:
        handle.remove()
    assert real["clean"].ratio == 1.0 and real["PGD-AT"].ratio > 4.0
    # a method that does the clean step and more is never shown cheaper than clean: a median
    # below 1 (timing noise, e.g. weight decay's 0.99×) is shown as 1 beside the measured value
    from gradreg.cost import StepCost, floor_at_clean

    noisy = StepCost(ratio=0.99, lo=0.97, hi=1.02, seconds=0.05, rounds=10)
    shown = floor_at_clean(noisy)
    assert (shown.ratio, shown.measured, shown.lo, shown.hi) == (1.0, 0.99, 0.97, 1.02)
    assert shown.text() == "1.00× (measured 0.99×) [0.97, 1.02]" and shown.as_dict()["measured"] == 0.99
    assert floor_at_clean(real["PGD-AT"]) == real["PGD-AT"]
    import gradreg.reproduce as reproduce

    with pytest.MonkeyPatch.context() as mp:  # the measurement says PGD-AT is cheaper than clean
        mp.setattr(reproduce, "interleaved_costs", lambda steps, **kw: {"clean": StepCost(1.0, 1.0, 1.0, 0.05, 2),
                                                                        "PGD-AT": noisy})
        cheap = step_costs(exp, rows, budget, Path("/tmp/unused"), None, rounds=2)
    assert cheap["PGD-AT"] == shown and cheap["clean"].measured is None


def test_lrc_command_and_experiment_share_one_default_noise_scale() -> None:
    """``gradreg lrc`` without --scale, an ``[lrc]`` table without ``scale`` and the shipped
    lrc-cifar10 experiment all use the one constant gradreg.attacks.lrc.DEFAULT_LRC_SCALE."""
    import argparse
    from dataclasses import replace

    from gradreg.attacks.lrc import DEFAULT_LRC_SCALE
    from gradreg.commands import lrc as lrc_command
    from gradreg.tables import LRCSettings

    parser = argparse.ArgumentParser()
    lrc_command.add_arguments(parser)
    cli_default = parser.get_default("scale")
    exp = experiments.load("lrc-cifar10")
    bare = replace(exp, lrc={k: v for k, v in exp.lrc.items() if k != "scale"})
    assert cli_default == LRCSettings.declared(bare, {}).scale == DEFAULT_LRC_SCALE
    assert LRCSettings.declared(exp, {}).scale == DEFAULT_LRC_SCALE  # the experiment states the default


def test_every_budget_row_builds_its_objective_and_paper_rows_say_where_they_depart() -> None:
    """Every row of every budget builds its objective without data, so a λ a penalty refuses
    (DataGrad's fd solver above φ) is caught here; rows of the operator-norm experiment each
    carry a note; its attack columns are in ℓ2, the norm all its rows train in."""
    from gradreg.objective import Objective
    for name in experiments.names():
        base = experiments.load(name)
        for budget in base.budgets:
            exp = base.for_budget(budget)
            for row in exp.rows:
                pen = penalties.make(row.method, **row.penalty)
                lam = pen.default_lam if row.lam is None else row.lam
                weight = pen.task_weight if row.task_weight is None else row.task_weight
                Objective([(row.method, pen, lam)], task_weight=weight)
                for value in row.lams or ():
                    Objective([(row.method, pen, value)], task_weight=weight)
    exp = experiments.load("opnorm-cifar10")
    assert exp.norm == "l2" and all(r.note for r in exp.rows)
    assert {r.penalty.get("norm") for r in exp.rows if r.penalty} == {"l2"}
    at = next(r for r in exp.rows if r.name == "adversarial training")
    assert at.method == "pgd-at" and at.penalty["adv_weight"] == 0.5  # the paper's clean + PGD mixture
    # the paper's λ (Table 1 of its ICLR-2020 version): 3e-4 global, 2e-2 data-dependent, whose
    # (λ/2)-forms are the penalties' own (gradreg.penalties.opnorm)
    lams = {r.name: r.lam for r in exp.rows}
    assert lams["global spectral norm"] == 3e-4 and lams["data-dependent operator norm"] == 2e-2


def test_sgr_budgets_train_with_the_papers_preprocessing() -> None:
    """The SGR paper pads, crops (CIFAR: flips, mid-range padding) and standardizes each image
    (SPEC §6): the budgets that claim it reach the training config; the tiny ones do not."""
    from gradreg.reproduce import row_config
    want = {("sgr-mnist", "cpu"): ("crop", "zero"), ("sgr-mnist", "paper"): ("crop", "zero"),
            ("sgr-cifar10", "paper"): ("crop-flip", "mid")}
    for name in ("sgr-mnist", "sgr-cifar10"):
        base = experiments.load(name)
        for budget, settings in base.budgets.items():
            exp = base.for_budget(budget)
            cfg = row_config(exp, exp.rows[0], settings, Path("/nonexistent"), None, seed=0)
            if (name, budget) in want:
                assert cfg.augment and (cfg.augment_kind, cfg.augment_pad) == want[(name, budget)]
                assert cfg.standardize == "per-image"
            else:
                assert not cfg.augment and cfg.standardize == "none"


def test_a_finished_run_of_another_configuration_is_refused_not_reused(tmp_path: Path) -> None:
    """The runner reuses a finished folder only when its stored configuration is the planned
    one (where and how it ran aside; a field newer than the folder as its default), and refuses,
    naming the differing fields, when a row changed since (e.g. PGD-AT given an ε ramp)."""
    from gradreg.config import TrainConfig
    from gradreg.runner import Runner, stale_fields

    cfg = TrainConfig(method="pgd-at", penalty={"eps": 0.3, "steps": 10}, epochs=3, out=str(tmp_path / "run"))
    run = Path(cfg.out)
    run.mkdir()
    stored = json.loads(json.dumps(cfg.to_dict()))
    del stored["monitor_drop"]  # written before that field existed: compares as its default
    (run / "config.json").write_text(json.dumps({"config": stored}))
    (run / "model.safetensors").write_bytes(b"")
    runner = Runner(print_only=True)
    moved = replace(cfg, quiet=True, device="cpu", data_dir="/elsewhere")  # where and how it runs: still the same run
    assert stale_fields(moved) == [] and runner.run([("PGD-AT", moved)]) == 0 and runner.printed == []
    ramped = replace(cfg, penalty={"eps": 0.3, "steps": 10, "eps_ramp_steps": 63})
    with pytest.raises(ValueError, match=r"another configuration .*differs in penalty\)"):
        runner.run([("PGD-AT", ramped)])
    assert stale_fields(replace(cfg, epochs=10)) == ["epochs"]  # more epochs is another model, not a resume
    assert stale_fields(replace(cfg, monitor_drop=0.5)) == ["monitor_drop"]


def test_rows_with_one_objective_are_found_with_the_modules_defaults_filled_in() -> None:
    """sgr-mnist's DataGrad-L1 (exact, λ 0.05) and Lyu ℓ∞ (exact, σ 0.05, λ 1) are both
    L + 0.05·‖∇ₓL‖₁: one group, although their declared parameters differ; so are DataGrad's
    finite-difference solver at its default φ and Lyu's one-step at σ = φ; ℓ2 DataGrad is not."""
    from gradreg.reading import alias_groups

    exp = experiments.load("sgr-mnist")
    rows = {r.name: r for r in exp.rows}
    lams = {r.name: r.lam for r in exp.rows}
    groups = alias_groups(list(rows.values()), lams)
    assert groups.get("DataGrad-L1") == ["Lyu (ℓ∞)"] and "DataGrad-L2" not in str(groups)
    fd = replace(rows["DataGrad-L1"], penalty={"p": 1, "solver": "fd"}, lam=0.05)  # φ defaults to 0.1: weight ½
    onestep = replace(rows["Lyu (ℓ∞)"], penalty={"norm": "linf", "solver": "onestep", "sigma": 0.1}, lam=0.5)
    other = replace(onestep, name="other", lam=0.25)
    assert alias_groups([fd, onestep, other], {}) == {fd.name: [onestep.name]}
    aux = {"aux": "parity"}  # multi-task: DataGrad penalizes every head, Lyu the main one
    mt = [replace(rows["DataGrad-L1"], train=aux), replace(rows["Lyu (ℓ∞)"], train=aux)]
    assert alias_groups(mt, lams) == {}
    # the numbers behind the identity: the two penalties' terms on one batch, times their λ
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).double()
    x, y = torch.rand(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    from gradreg.penalties import CleanPass

    dg = penalties.make("datagrad", p=1)
    ly = penalties.make("lyu", norm="linf", sigma=0.05)
    a = 0.05 * dg.term(model, x, y, CleanPass.standalone(model, x, y, need_input_grad=True)).value
    b = 1.0 * ly.term(model, x, y, CleanPass.standalone(model, x, y, need_input_grad=True)).value
    torch.testing.assert_close(a, b)
