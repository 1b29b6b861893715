"""The family benchmark (experiment family-mnist10k): its tiny budget end to end, its
other budgets built without data, and the pieces it added (tuned λ, PGD restarts, budget ε,
the honest reading)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from gradreg import attacks, data, experiments, penalties
from gradreg.cli import main
from gradreg.cost import StepCost
from gradreg.penalties import noise_aug  # noqa: F401  (registers "lrc-aug")
from gradreg.protocols import EvalSettings, ModelEval
from gradreg.reading import honest_reading
from gradreg.reproduce import GRADIENT_PENALTY_METHODS, autoattack_settings, report_only, row_config, sweep_grid
from gradreg.tables import RowResult
from gradreg.sweep import SweepSpec, sweep_points
from gradreg.threat import ThreatModel

NAME = "family-mnist10k"
ROWS = ["clean", "weight decay", "DataGrad-ℓ1", "DataGrad-ℓ2", "DataGrad-ℓ1 (fd)", "DataGrad-ℓ2 (fd)",
        "Lyu ℓ∞ (one-step)", "MT-DataGrad", "GN", "SGR (sign Σ)", "SGR (PGD Σ)", "ARR", "TRADES",
        "operator norm (cold)", "operator norm (warm, ours)", "spectral norm", "LRC-augmented", "FGSM-AT",
        "PGD-AT (Madry)", "PGD-AT (SGR mixture)"]


@pytest.mark.slow
def test_tiny_family_benchmark_end_to_end(tmp_path: Path) -> None:
    """Every row, column and plot of the report, in about a minute on 2 shared cores."""
    started = time.perf_counter()
    assert main(["reproduce", NAME, "--budget", "tiny", "--out", str(tmp_path)]) == 0
    elapsed = time.perf_counter() - started
    exp = experiments.load(NAME).for_budget("tiny")
    result = json.loads((tmp_path / "results.json").read_text())
    report = (tmp_path / "report.md").read_text()
    assert list(result["rows"]) == ROWS == [r.name for r in exp.rows]
    assert result["display_columns"] == ["test", "PGD ε=0.1", "AA ε=0.1", "worst ε=0.1"]
    assert ("| method | test | PGD ε=0.1 | AA ε=0.1 | worst ε=0.1 | step ×clean | train min | overfit | checks |"
            in report)
    assert "## Catastrophic-overfitting monitor" in report
    assert "PGD-5, 2 random starts and AutoAttack" in report
    for name, row in result["rows"].items():
        for col in ("test", "PGD ε=0.1", "AA ε=0.1", "worst ε=0.1"):
            iv = row["intervals"][col]
            assert iv["n"] == (100 if col == "test" else 50) and iv["lo"] <= iv["value"] <= iv["hi"], (name, col)
        assert row["step_cost"]["ratio"] > 0 and row["train_seconds"] > 0, name
        assert f"| {name} |" in report and f"- **{name}**: " in report  # a row of the table and its protocol note
        # the worst case over the attacks run is never above any single attack's accuracy
        assert row["intervals"]["worst ε=0.1"]["value"] <= min(row["intervals"][c]["value"]
                                                               for c in ("PGD ε=0.1", "AA ε=0.1")) + 1e-12, name
        # every training ran the monitor; its record is the run's own log (independent of the report)
        (mon,) = row["monitor_per_seed"]
        assert mon["flags"] == 0 and mon["points"] == 256, name
        ev = row["evals"][0]
        assert len(ev["raw_curves"]["pgd"]) == 3  # the budget's curve_eps: "accuracy falls with ε" has data
        checks = {c["name"]: c["passed"] for c in ev["checks"]}
        assert checks["accuracy falls with ε"] is not None
        audited = exp.rows[ROWS.index(name)].method in GRADIENT_PENALTY_METHODS
        assert (ev["autoattack"][0].get("square") is not None) == audited, name
        assert (checks["gradient-free attack breaks no more than the gradient attacks"] is None) == (not audited), name
    # λ: every row says which it used and where it came from; tuned rows come from their sweep
    lam = result["lam"]
    assert list(lam) == ROWS
    for r in exp.rows:
        choice = lam[r.name]
        if r.lams:
            assert choice["source"] in ("sweep", "declared (sweep chose none)") and len(choice["grid"]) == 1
            assert choice["lam"] in r.lams and (tmp_path / choice["record"] / "sweep.png").is_file()
            sweep = json.loads((tmp_path / choice["record"] / "sweep.json").read_text())
            assert sweep["spec"]["base"]["validation_fraction"] > 0  # tuned on a split of the training data
            assert sweep["chosen_lam"] == (choice["lam"] if choice["source"] == "sweep" else None)
        else:
            assert choice["source"] == "declared" and choice["grid"] == []
    assert "## λ of every row" in report
    # the frontier, the norms and the honest reading
    assert (tmp_path / "frontier.png").stat().st_size > 0 and (tmp_path / "norms.png").stat().st_size > 0
    front, points = result["frontier"]["front"], result["frontier"]["points"]
    cheapest = min(points, key=lambda p: (p["cost_ratio"], -p["autoattack"]))
    assert cheapest["name"] in front and set(front) <= set(ROWS)  # the cheapest of the most robust is never dominated
    assert [p["name"] for p in points] == ROWS and "![frontier](frontier.png)" in report
    assert {n: [s["quantity"] for s in v] for n, v in result["norms"].items()} == {
        n: ["grad_l1", "grad_l2", "opnorm_linf_l2"] for n in ROWS}
    assert "![norms](norms.png)" in report
    reading = result["reading"]
    assert reading["sentence"] in report and reading["sentence"].startswith("Which method, if any, reaches 90%")
    aliased = {a for names in result["aliases"].values() for a in names}
    candidates = [n for n, r in zip(ROWS, exp.rows) if r.method not in ("clean", "pgd-at") and n not in aliased]
    assert "FGSM-AT" in candidates  # a cheap baseline competes like any regularizer
    assert [v.split(":")[0] for v in reading["rows"]] == candidates
    assert set(reading["reached"]) <= set(candidates)
    print(f"tiny family benchmark: {elapsed:.0f} s")
    # a re-run (an interrupted one resumed) reuses every finished training *and* evaluation
    assert sorted(p.stem for p in (tmp_path / "evaluations" / "s0").glob("*.json")) == sorted(r.slug for r in exp.rows)
    import gradreg.protocols as protocols

    def no_attack(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished evaluation was attacked again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(protocols, "evaluate_model", no_attack)
        assert main(["reproduce", NAME, "--budget", "tiny", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    trainings = len(ROWS) + len(list((tmp_path / "sweeps" / "runs").iterdir()))  # rows, sweep points, clean references
    assert (f"It reused {trainings} of {trainings} trainings (sweep points included) and {len(ROWS)} of {len(ROWS)} "
            "model evaluations") in (tmp_path / "report.md").read_text()
    assert "It reused" not in report  # the first invocation did everything itself
    assert {n: r["intervals"] for n, r in again["rows"].items()} == {n: r["intervals"] for n, r in result["rows"].items()}
    # --report-only rebuilds the same tables from the folder, without training or attacking
    table = (tmp_path / "table.csv").read_text()
    (tmp_path / "table.csv").unlink()
    (tmp_path / "frontier.png").unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(protocols, "evaluate_model", no_attack)
        mp.setattr("gradreg.runner.train", no_attack)  # nothing is trained again
        assert main(["reproduce", NAME, "--budget", "tiny", "--out", str(tmp_path), "--report-only"]) == 0
    assert (tmp_path / "table.csv").read_text() == table and (tmp_path / "frontier.png").is_file()
    rendered = json.loads((tmp_path / "results.json").read_text())
    assert rendered["table_markdown"] == again["table_markdown"] and rendered["reading"] == again["reading"]
    assert rendered["differences"] == again["differences"]
    assert rendered["lam"] == again["lam"]  # the sweeps' stop reasons and validation curves survive re-rendering
    assert "Re-rendered from the stored per-example outcomes" in (tmp_path / "report.md").read_text()
    assert main(["reproduce", NAME, "--budget", "tiny", "--out", str(tmp_path / "empty"), "--report-only"]) != 0
    with pytest.raises(FileNotFoundError, match="finished output folder"):
        report_only(NAME, budget_name="tiny", out=tmp_path / "empty")


@pytest.mark.parametrize("budget", ["tiny", "cpu", "paper", "paper-cifar10"])
def test_every_budget_builds_its_rows_sweeps_and_evaluation(budget: str, tmp_path: Path) -> None:
    """No dry-run mode in reproduce: every budget is resolved, every row's training configuration
    validates, its penalty builds, its sweep points validate, and the evaluation settings build."""
    exp = experiments.load(NAME).for_budget(budget)
    b = exp.budget(budget)
    assert exp.autoattack_eps == {"tiny": 0.1, "cpu": 0.1, "paper": 0.3, "paper-cifar10": pytest.approx(8 / 255)}[budget]
    assert b["data"] == {"tiny": "digits", "cpu": "mnist10k", "paper": "mnist", "paper-cifar10": "cifar10"}[budget]
    if budget != "tiny":
        assert b["seeds"] == [0, 1, 2]
    for row in exp.rows:
        cfg = row_config(exp, row, b, tmp_path, None)
        assert all(v != experiments.EPS for v in cfg.penalty.values()), row.name
        penalties.make(row.method, **row.penalty)
        if row.lams:
            assert row.lam in row.lams and row.lam == sweep_grid(row.lams, 1)[0], row.name
            cfg.validation_fraction, cfg.validation_eps = 0.2, exp.autoattack_eps
            points = sweep_points(SweepSpec(base=cfg, lams=sweep_grid(row.lams, b.get("sweep_points")), out=tmp_path))
            assert points[0].role == "reference" and len(points) == 1 + len(sweep_grid(row.lams, b.get("sweep_points")))
    settings = EvalSettings(pgd_restarts=int(b.get("pgd_restarts", 1)), **(autoattack_settings(exp, b) or {}))
    settings.make_attack("pgd")
    settings.make_autoattack()


def test_sweep_grid_and_budget_eps() -> None:
    assert sweep_grid([1.0, 2.0, 3.0], 1) == [2.0] and sweep_grid([1.0, 2.0, 3.0, 4.0], 1) == [2.0]
    assert sweep_grid([1.0, 2.0, 3.0], 2) == [1.0, 3.0] and sweep_grid([1.0, 2.0, 3.0], None) == [1.0, 2.0, 3.0]
    assert sweep_grid([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.0, 3.0, 5.0]
    with pytest.raises(ValueError, match="sweep_points"):
        sweep_grid([1.0, 2.0], 0)
    exp = experiments.load(NAME)
    exp.budgets["noeps"] = {"data": "digits"}
    with pytest.raises(ValueError, match="sets no eps"):
        exp.for_budget("noeps")
    other = experiments.load("sgr-mnist")
    assert other.for_budget("tiny").autoattack_eps == 0.1  # experiments without "$eps" are unchanged


def test_pgd_restarts_never_find_fewer_examples(digits_mlp: torch.nn.Module, digits: data.DataBundle) -> None:
    x, y = digits.test_x[:200], digits.test_y[:200]
    threat = ThreatModel("linf", 0.05, digits.bounds)
    fooled = []
    for restarts in (1, 4):
        attack = attacks.make("pgd", steps=3, restarts=restarts, seed=0)
        fooled.append(attack.success_curve(digits_mlp, x, y, threat, [0.05])[0])
    assert (fooled[1] | ~fooled[0]).all()  # every point one walk breaks, the restarts break too
    assert fooled[1].sum() >= fooled[0].sum()
    with pytest.raises(ValueError, match="restarts"):
        attacks.make("pgd", restarts=2, random_start=False)


def _row(name: str, method: str, aa: list[int], cost: float, ratios: tuple[float, ...] = ()) -> RowResult:
    flags = torch.tensor(aa, dtype=torch.bool)
    ev = ModelEval(name=name, eps=[0.0], clean=1.0, curves={}, clean_flags=torch.ones(len(aa), dtype=torch.bool),
                   autoattack=[{"eps": 0.1, "pgd_bits": "1" * len(aa)}], aa_flags={0.1: flags})
    return RowResult(name, method, [ev], [1.0], [1.0], step_cost=StepCost(cost, cost, cost, cost, 3, ratios=ratios))


def test_honest_reading_follows_the_paired_test() -> None:
    n = 400
    pgd_at = [1] * 200 + [0] * 200  # 50 %: the bar is 45 %
    results = {"clean": _row("clean", "clean", [0] * n, 1.0),
               "PGD-AT": _row("PGD-AT", "pgd-at", pgd_at, 10.0),
               "A": _row("A", "gn", [1] * 260 + [0] * 140, 2.0),  # 65 %, cheap: reaches the bar
               "B": _row("B", "gn", [1] * 182 + [0] * 218, 2.0),  # 45.5 %, cheap: not distinguishable
               "C": _row("C", "gn", [1] * 100 + [0] * 300, 2.0),  # 25 %, cheap: falls short
               "D": _row("D", "trades", [1] * 300 + [0] * 100, 8.0)}  # 75 % but 80 % of the cost
    spec = {"reference": "PGD-AT", "accuracy_fraction": 0.9, "cost_fraction": 0.35,
            "exclude_methods": ["clean", "pgd-at"]}
    got = honest_reading(spec, results, "AA ε=0.1")
    assert got["reached"] == ["A"] and got["undecided"] == ["B"]
    assert "**A**" in got["sentence"] and got["reference_autoattack"] == 0.5
    verdicts = dict(v.split(": ", 1) for v in got["rows"])
    assert "reaches the bar" in verdicts["A"] and "not distinguishable" in verdicts["B"]
    assert "falls short" in verdicts["C"] and "over the 35% bar" in verdicts["D"]
    del results["A"]
    assert "**None established**: B is within the cost bar" in honest_reading(spec, results, "AA ε=0.1")["sentence"]
    results["PGD-AT"] = _row("PGD-AT", "pgd-at", [0] * n, 10.0)
    assert "Void here" in honest_reading(spec, results, "AA ε=0.1")["sentence"]


def test_honest_reading_bar_is_a_share_of_the_gain_and_cost_can_be_on_the_edge() -> None:
    n = 400
    ref_ratios = (9.0, 10.0, 11.0, 10.0, 9.5, 10.5, 10.0, 9.0, 11.0, 10.0)
    results = {"clean": _row("clean", "clean", [1] * 200 + [0] * 200, 1.0, (1.0,) * 10),  # clean model: 50 %
               "PGD-AT": _row("PGD-AT", "pgd-at", [1] * 300 + [0] * 100, 10.0, ref_ratios),  # 75 %
               # 72 %: above 0.9 × 75 = 67.5 but below the gain bar 50 + 0.9 × 25 = 72.5
               "F": _row("F", "fgsm-at", [1] * 288 + [0] * 112, 2.0, (2.0,) * 10),
               # as robust as the reference, at a cost whose interval over rounds holds 35 %
               "E": _row("E", "gn", [1] * 300 + [0] * 100, 3.5, (2.8, 3.9, 3.3, 3.6, 3.2, 3.8, 3.5, 3.0, 4.0, 3.4))}
    spec = {"reference": "PGD-AT", "accuracy_fraction": 0.9, "cost_fraction": 0.35, "exclude_methods": ["pgd-at"]}
    got = honest_reading(spec, results, "AA ε=0.1")
    assert got["bar"] == pytest.approx(0.725) and got["clean_autoattack"] == 0.5
    verdicts = dict(v.split(": ", 1) for v in got["rows"])
    assert list(verdicts) == ["F", "E"]  # the cheap baseline FGSM-AT is a candidate
    assert "within the 35% bar" in verdicts["F"] and "reaches the bar" not in verdicts["F"]
    assert "on the edge of the 35% bar" in verdicts["E"] and "95 % interval" in verdicts["E"]
    assert got["reached"] == [] and got["cost_edge"] == ["E"] and "on the edge of the cost bar" in got["sentence"]
    assert "Holm-adjusted" in verdicts["E"]


def test_the_lambda_table_flags_a_choice_at_the_end_of_its_grid() -> None:
    from gradreg.experiment_figures import grid_edge, tuning_lines
    from gradreg.tables import LamChoice

    grid = (0.1, 1.0, 10.0)
    top = LamChoice(10.0, "sweep", "rule", grid, "sweeps/gn")
    inner = LamChoice(1.0, "sweep", "rule", grid, "sweeps/sgr")
    bottom = LamChoice(0.1, "sweep", "rule", grid, "sweeps/arr")
    fallback = LamChoice(1.0, "declared (sweep chose none)", "rule", grid, "sweeps/x")
    single = LamChoice(1.0, "sweep", "rule", (1.0,), "sweeps/y")
    assert [grid_edge(c) for c in (top, inner, bottom, fallback, single)] == ["upper", None, "lower", None, None]
    text = "\n".join(tuning_lines({"GN": top, "SGR": inner, "ARR": bottom}, {"GN": "gn", "SGR": "sgr", "ARR": "arr"}))
    assert "| GN | gn | 10 (upper end) |" in text and "| SGR | sgr | 1 |" in text and "| ARR | arr | 0.1 (lower end) |" in text
    assert "2 of 3 swept rows chose an end of their grid (GN, ARR)" in text
    quiet = "\n".join(tuning_lines({"SGR": inner}, {"SGR": "sgr"}))
    assert "end of their grid" not in quiet


def test_the_lambda_table_shows_each_sweeps_validation_curve(tmp_path: Path) -> None:
    from gradreg.experiment_figures import tuning_lines
    from gradreg.tables import LamChoice

    curve = ((0.1, 0.98, 0.40), (1.0, 0.97, 0.55), (10.0, 0.90, 0.50))  # (λ, clean, PGD)
    choice = LamChoice(1.0, "sweep", "rule", (0.1, 1.0, 10.0), "sweeps/sgr", curve=curve)
    text = "\n".join(tuning_lines({"SGR": choice}, {"SGR": "sgr"}, tmp_path))
    assert "| 0.1: 40.0/98.0, **1: 55.0/97.0**, 10: 50.0/90.0 |" in text
    assert (tmp_path / "lambda.png").is_file() and "![validation accuracy against λ](lambda.png)" in text
    assert "lambda.png" not in "\n".join(tuning_lines({"SGR": LamChoice(1.0, "declared", "no grid")}, {"SGR": "sgr"},
                                                       tmp_path / "none"))


class _Quantized(torch.nn.Module):
    """A planted gradient-masking model: the input is rounded to {0, ½, 1} before the MLP, so its
    input gradient is zero almost everywhere (gradient attacks stall), while a query-based attack
    that pushes a pixel across a rounding threshold still changes the prediction."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 2) / 2)


def _audited(model: torch.nn.Module, bundle: data.DataBundle) -> ModelEval:
    from gradreg.protocols import evaluate_model

    settings = EvalSettings(eps=[0.2], attacks=("pgd",), pgd_steps=20, pgd_restarts=2, deepfool=False,
                            unbounded_check=False, n_test=60, autoattack=True, aa_eps=[0.2], aa_version="custom",
                            aa_params={"attacks": ["apgd-ce"], "n_iter": 20}, square_n=60, square_queries=300)
    return evaluate_model(model, bundle, settings, name="m", progress=False)


def test_square_audit_catches_a_masked_model_and_passes_a_normal_one(digits_mlp: torch.nn.Module,
                                                                      digits: data.DataBundle) -> None:
    from gradreg.protocols import square_check

    masked = _audited(_Quantized(digits_mlp).eval(), digits)
    check = square_check(masked)
    assert check.passed is False and "Square (300 queries) broke" in check.detail, check.detail
    normal = square_check(_audited(digits_mlp, digits))
    assert normal.passed is True, normal.detail


def test_a_check_without_data_says_not_measured() -> None:
    from gradreg.protocols import masking_checks, masking_lines, masking_summary

    flags = torch.ones(1, 50, dtype=torch.bool)
    ev = ModelEval(name="m", eps=[0.1], clean=1.0, curves={"pgd": [1.0]}, raw_curves={"pgd": [1.0]},
                   clean_flags=torch.ones(50, dtype=torch.bool), flags={"pgd": flags},
                   autoattack=[{"eps": 0.1, "accuracy": 1.0, "pgd": 1.0, "pgd_bits": "1" * 50}],
                   aa_flags={0.1: torch.ones(50, dtype=torch.bool)})
    checks = {c.name: c for c in masking_checks(ev)}
    falls = checks["accuracy falls with ε"]
    assert falls.passed is None and falls.status == "not measured"
    audit = checks["gradient-free attack breaks no more than the gradient attacks"]
    assert audit.passed is None and "no Square audit" in audit.detail
    text = "\n".join(masking_lines([("m", list(checks.values()))]))
    assert "m: not measured — accuracy falls with ε" in text and "m: ok — accuracy falls" not in text
    assert masking_summary(list(checks.values())) == "ok (2 of 4 measured)"  # PGD strongest and AutoAttack close to PGD had data
