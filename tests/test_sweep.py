"""λ sweeps: the selection rule, the validation split (the test split is never read), run
names, printed commands, running, gathering and reuse."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradreg import cli, data
from gradreg.config import ConfigError, TrainConfig
from gradreg.data.source import TrainSource
from gradreg.data.validation import carve_validation, validation_indices
from gradreg.sweep import (SweepRow, SweepSpec, config_overrides, pick_best_pgd, pick_within_clean,
                           sweep_points)
from gradreg.trainer import train


def _row(lam: float, clean: float | None, pgd: float | None, status: str = "done") -> SweepRow:
    return SweepRow(name=f"p{lam:g}", role="point", lam=lam, eps=None, status=status, clean_accuracy=clean,
                    pgd_accuracy=pgd)


# a hand-made sweep: clean model 0.990; floor at 1 point is 0.980
TABLE = [
    _row(0.01, 0.991, 0.20),
    _row(0.1, 0.985, 0.45),
    _row(1.0, 0.981, 0.60),  # the answer: best PGD among clean ≥ 0.980
    _row(3.0, 0.979, 0.75),  # better PGD but 1.1 points below clean: excluded
    _row(10.0, 0.90, 0.85),
    _row(30.0, None, None, status="failed"),
]


def test_within_clean_rule_picks_the_right_lambda() -> None:
    best, reason = pick_within_clean(TABLE, 0.990, 1.0)
    assert best is not None and best.lam == 1.0
    assert "0.9800" in reason
    # a wider tolerance admits λ = 3; a tighter one leaves λ = 0.01 and 0.1 only
    assert pick_within_clean(TABLE, 0.990, 1.2)[0].lam == 3.0  # type: ignore[union-attr]
    assert pick_within_clean(TABLE, 0.990, 0.5)[0].lam == 0.1  # type: ignore[union-attr]
    # nothing qualifies / no reference yet: no choice, with the reason
    assert pick_within_clean(TABLE, 0.999, 0.01)[0] is None
    assert pick_within_clean(TABLE, None, 1.0) == (None, "the clean reference run has not finished")
    # the unconstrained rule ignores clean accuracy but never a failed run
    assert pick_best_pgd(TABLE, 0.990, 1.0)[0].lam == 10.0  # type: ignore[union-attr]


def test_within_clean_ties_go_to_higher_clean_then_smaller_lambda() -> None:
    rows = [_row(1.0, 0.985, 0.5), _row(0.3, 0.985, 0.5), _row(3.0, 0.986, 0.5)]
    assert pick_within_clean(rows, 0.99, 1.0)[0].lam == 3.0  # type: ignore[union-attr]
    assert pick_within_clean(rows[:2], 0.99, 1.0)[0].lam == 0.3  # type: ignore[union-attr]


class _TestSplitGuard:
    """A data bundle whose test split raises when read."""

    def __init__(self, bundle: data.DataBundle) -> None:
        self._bundle = bundle

    def __getattr__(self, name: str) -> object:
        if name in ("test_x", "test_y"):
            raise AssertionError(f"the test split was read ({name})")
        return getattr(self._bundle, name)


def test_validation_split_is_stratified_deterministic_and_never_reads_test(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    full = data.load("digits")
    a = carve_validation(TrainSource.from_bundle(_TestSplitGuard(full)), fraction=0.2)  # type: ignore[arg-type]
    b = carve_validation(TrainSource.from_bundle(full), fraction=0.2)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    assert len(a.train_y) + len(a.test_y) == len(full.train_y)
    # the two parts partition the training split (no image in both, none from the test split)
    rows = {tuple(r.tolist()) for r in full.train_x.flatten(1)}
    assert all(tuple(r.tolist()) in rows for r in a.test_x.flatten(1))
    # stratified: each class's share within one point of its share in the training split
    full_share = torch.bincount(full.train_y, minlength=10) / len(full.train_y)
    val_share = torch.bincount(a.test_y, minlength=10) / len(a.test_y)
    assert (full_share - val_share).abs().max() < 0.01
    assert a.mean == full.mean and a.std == full.std

    real_load = data.load
    monkeypatch.setattr(data, "load", lambda name, **kw: _TestSplitGuard(real_load(name, **kw)))
    cfg = TrainConfig(data="digits", model="mlp", epochs=1, quiet=True, out=str(tmp_path / "v"),
                      validation_fraction=0.2, validation_eps=0.1, validation_pgd_steps=3)
    metrics = train(cfg, log=lambda s: None)
    assert metrics["eval_split"] == "validation" and "test_accuracy" not in metrics
    assert 0 <= metrics["validation_pgd_accuracy"] <= metrics["validation_accuracy"] <= 1
    # without a validation split the same guard trips: the guard itself works
    with pytest.raises(AssertionError, match="test split was read"):
        train(TrainConfig(data="digits", model="mlp", epochs=1, quiet=True, out=str(tmp_path / "t")),
              log=lambda s: None)


def test_run_names_are_deterministic_and_follow_the_config(tmp_path: Path) -> None:
    base = TrainConfig(method="gn", epochs=1, validation_fraction=0.2, validation_eps=0.1)
    spec = SweepSpec(base=base, lams=[0.1, 1.0], eps_values=[0.05, 0.1], out=tmp_path)
    points = sweep_points(spec)
    assert [p.role for p in points] == ["reference"] + ["point"] * 4
    assert [(p.lam, p.eps) for p in points[1:]] == [(0.1, 0.05), (1.0, 0.05), (0.1, 0.1), (1.0, 0.1)]
    assert points[1].config.penalty == {"eps": 0.05} and points[0].config.method == "clean"
    assert [p.name for p in points] == [p.name for p in sweep_points(spec)]
    assert len({p.name for p in points}) == 5
    assert points[1].name.startswith("gn-lam0.1-eps0.05-")
    # where a run executes does not change its name; what it computes does
    other = sweep_points(SweepSpec(base=TrainConfig(method="gn", epochs=2, validation_fraction=0.2, validation_eps=0.1),
                                   lams=[0.1], out=tmp_path))
    same = sweep_points(SweepSpec(base=TrainConfig(method="gn", epochs=1, validation_fraction=0.2, validation_eps=0.1,
                                                   device="cpu"), lams=[0.1], out=tmp_path))
    assert same[1].name == sweep_points(SweepSpec(base=base, lams=[0.1], out=tmp_path))[1].name
    assert other[1].name != same[1].name
    assert "validation_fraction=0.2" in config_overrides(points[1].config)
    with pytest.raises(ConfigError, match="validation_fraction"):
        SweepSpec(base=TrainConfig(validation_eps=0.1), lams=[1.0], out=tmp_path)
    with pytest.raises(ConfigError, match="validation_eps"):
        SweepSpec(base=TrainConfig(validation_fraction=0.2), lams=[1.0], out=tmp_path)


GUARD = """
import sys
from gradreg import data
_load = data.load

class Guard:
    def __init__(self, b):
        self._b = b
    def __getattr__(self, k):
        if k in ("test_x", "test_y"):
            raise SystemExit("the test split was read")
        return getattr(self._b, k)

data.load = lambda name, **kw: Guard(_load(name, **kw))
from gradreg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_tiny_sweep_print_commands_run_gather_and_reuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    guard = tmp_path / "guard.py"
    guard.write_text(GUARD)
    out = tmp_path / "sweep"
    args = ["sweep", "--method", "gn", "--lams", "0.01", "1", "--epochs", "1", "--model", "mlp",
            "--validation-eps", "0.1", "--validation-pgd-steps", "3", "--out", str(out)]
    # 1. the commands, one per line, with a launcher that fails any run that reads the test split
    assert cli.main(args + ["--print-commands", "--launcher", f"{sys.executable} {guard}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(" train --resume --out " in line for line in lines)
    # 2. an external "scheduler" runs two of the lines in a shell, in parallel
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen(line, shell=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for line in lines[:2]]
    outputs = [p.communicate()[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    # 3. gathering a partial sweep: the missing λ is pending, nothing chosen from missing data
    assert cli.main(args + ["--gather"]) == 0
    partial = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in partial["rows"]] == ["done", "pending"]
    # 4. run the rest here: finished runs are reused, not trained again
    run_dirs = [Path(shlex.split(line)[shlex.split(line).index("--out") + 1]) for line in lines]
    stamps = {d: (d / "metrics.json").stat().st_mtime_ns for d in run_dirs[:2]}
    assert cli.main(args + ["--jobs", "2", "--launcher", f"{sys.executable} {guard}"]) == 0
    printed = capsys.readouterr().out
    assert "reusing 2 finished run(s)" in printed
    assert {d: (d / "metrics.json").stat().st_mtime_ns for d in run_dirs[:2]} == stamps
    result = json.loads((out / "sweep.json").read_text())
    assert result["rule"] == "within-clean" and result["reference"]["status"] == "done"
    assert [r["status"] for r in result["rows"]] == ["done", "done"]
    assert result["chosen_lam"] in (0.01, 1.0)
    for r in result["rows"]:
        assert not Path(r["run_dir"]).is_absolute()  # relative to sweep.json's folder: it moves with it
        m = json.loads((out / r["run_dir"] / "metrics.json").read_text())
        assert m["eval_split"] == "validation" and r["pgd_accuracy"] == m["validation_pgd_accuracy"]
    assert (out / "sweep.png").stat().st_size > 0
    table = (out / "sweep.md").read_text()
    assert "| 0.01 |" in table and "| 1 |" in table and "←" in table
    # nothing left to print
    assert cli.main(args + ["--print-commands"]) == 0
    assert capsys.readouterr().out == ""


# ----- widening a grid whose choice is at an end (gradreg.widen) --------------------------------
from gradreg.widen import LamScore, Limits, decide, hard_limits  # noqa: E402

REF = LamScore(0.0, 0.990, 0.10)  # the clean model: floor 0.980 at 1 point


def _grid(*rows: tuple[float, float, float]) -> list[LamScore]:
    return [LamScore(lam, clean, pgd) for lam, clean, pgd in rows]


def test_widening_extends_a_grid_whose_best_point_is_at_the_top_by_its_own_ratio() -> None:
    rising = _grid((0.1, 0.989, 0.20), (1.0, 0.987, 0.30), (10.0, 0.985, 0.40))
    d = decide(rising, REF, rounds_left=2)
    assert d.chosen == 10.0 and d.widen == (pytest.approx(100.0),) and d.stop == ""
    # the grid's own ratio at that end (3 here), not a fixed factor
    d = decide(_grid((1.0, 0.989, 0.2), (2.0, 0.988, 0.3), (6.0, 0.985, 0.4)), REF, rounds_left=1)
    assert d.widen == (pytest.approx(18.0),)
    # the rounds spent: the end choice stands and says so
    d = decide(rising, REF, rounds_left=0)
    assert d.chosen == 10.0 and d.widen == () and d.stop == "max-widen" and "no round is left" in d.reason


def test_widening_extends_downwards_when_robustness_falls_with_lambda() -> None:
    falling = _grid((0.1, 0.989, 0.40), (1.0, 0.987, 0.30), (10.0, 0.985, 0.20))
    d = decide(falling, REF, rounds_left=1)
    assert d.chosen == 0.1 and d.widen == (pytest.approx(0.01),)
    # every λ too costly in clean accuracy: go down towards the clean model, which is admissible
    d = decide(_grid((1.0, 0.95, 0.5), (10.0, 0.90, 0.6)), REF, rounds_left=1)
    assert d.chosen is None and d.widen == (pytest.approx(0.1),)
    # a bottom that is not better than the clean model: smaller λ only approach it
    d = decide(_grid((0.1, 0.989, 0.105), (1.0, 0.987, 0.05), (10.0, 0.985, 0.02)), REF, rounds_left=1)
    assert d.chosen == 0.1 and d.widen == () and d.stop == "clean-model"


def test_widening_stops_at_an_interior_choice() -> None:
    peaked = _grid((0.1, 0.989, 0.20), (1.0, 0.987, 0.45), (10.0, 0.985, 0.30))
    d = decide(peaked, REF, rounds_left=3)
    assert d.chosen == 1.0 and d.widen == () and d.stop == "interior"
    # a widened grid whose new top point lost: the former end is now interior
    d = decide(_grid((0.1, 0.989, 0.2), (1.0, 0.987, 0.3), (10.0, 0.985, 0.4), (100.0, 0.982, 0.35)), REF, rounds_left=2)
    assert d.chosen == 10.0 and d.stop == "interior"
    # the clean-accuracy floor bounds the choice from above: nothing to widen
    d = decide(_grid((0.1, 0.989, 0.2), (1.0, 0.985, 0.3), (10.0, 0.95, 0.9)), REF, rounds_left=2)
    assert d.chosen == 1.0 and d.stop == "interior"


def test_widening_respects_a_hard_limit() -> None:
    fd = hard_limits("datagrad", {"p": 1, "solver": "fd", "fd_step": 0.1})
    assert fd.upper == 0.1 and "φ = 0.1" in fd.upper_reason
    assert hard_limits("datagrad", {"p": 1, "solver": "exact"}).upper == math.inf
    assert hard_limits("datagrad", {"p": 2, "solver": "fd"}).upper == 2.0  # the module's default φ
    assert hard_limits("lyu", {"solver": "onestep"}).upper == 1.0
    assert hard_limits("gn", {}, stated_max=30.0).upper == 30.0
    rising = _grid((0.01, 0.989, 0.2), (0.03, 0.988, 0.3), (0.1, 0.986, 0.4))
    d = decide(rising, REF, limits=fd, rounds_left=3)
    assert d.chosen == 0.1 and d.widen == () and d.stop == "limit" and "φ = 0.1" in d.reason
    # below the limit, the next λ is clamped to it, never beyond
    d = decide(_grid((0.01, 0.989, 0.2), (0.05, 0.988, 0.4)), REF, limits=fd, rounds_left=3)
    assert d.widen == (pytest.approx(0.1),)
    # the lower end never reaches λ ≤ 0: one step is a division by the grid's ratio
    d = decide(_grid((1e-6, 0.989, 0.4), (1e-5, 0.989, 0.2)), REF, rounds_left=3)
    assert d.widen[0] > 0


def test_widening_ignores_a_one_image_difference() -> None:
    n = 1600  # MNIST-10k's validation split (0.2 of 8,000)
    one = 1 / n
    # the top λ better by one validation image: not a rise, the smaller λ stays chosen
    flat_top = _grid((0.1, 0.989, 0.20), (1.0, 0.987, 0.30), (10.0, 0.985, 0.30 + one))
    d = decide(flat_top, REF, rounds_left=3)
    assert d.chosen == 1.0 and d.widen == () and d.stop == "interior"
    # the rule without a margin would have taken the end and widened
    d0 = decide(flat_top, REF, margin_points=0.0, rounds_left=3)
    assert d0.chosen == 10.0 and d0.widen == (pytest.approx(100.0),)
    # a whole grid within a few images: a plateau, no widening
    d = decide(_grid((0.1, 0.989, 0.3 + 3 * one), (1.0, 0.987, 0.3), (10.0, 0.985, 0.3 + 5 * one)), REF, rounds_left=3)
    assert d.chosen == 0.1 and d.widen == () and d.stop == "plateau"


def test_widening_a_one_point_grid_looks_both_ways_and_waits_for_unfinished_runs() -> None:
    d = decide(_grid((1.0, 0.985, 0.3)), REF, rounds_left=1)
    assert d.chosen == 1.0 and d.widen == (pytest.approx(0.1), pytest.approx(10.0))
    d = decide(_grid((1.0, 0.985, 0.3)), REF, limits=Limits(1.0, "cap"), rounds_left=1)
    assert d.widen == (pytest.approx(0.1),)
    pending = [LamScore(1.0, None, None), LamScore(2.0, 0.98, 0.3)]
    assert decide(pending, REF, rounds_left=1).stop == "pending"


# ----- reproduce's trainings: in this process, as one-thread workers, or printed (gradreg.runner) ------
def _outcomes(out: Path) -> dict[str, object]:
    """What results.json says about the models (their λ and every evaluation), not about time."""
    result = json.loads((out / "results.json").read_text())
    sweep = json.loads((out / "sweeps" / "gn" / "sweep.json").read_text())
    return {"lam": {n: (c["lam"], c["source"], c["grid"], c["curve"]) for n, c in result["lam"].items()},
            "evals": {n: r["evals"] for n, r in result["rows"].items()},
            "validation": [(r["lam"], r["clean_accuracy"], r["pgd_accuracy"]) for r in [sweep["reference"], *sweep["rows"]]]}


@pytest.mark.slow
def test_reproduce_jobs_2_and_printed_commands_give_the_outcomes_of_jobs_1(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The family benchmark's tiny budget on its tuned GN row (a clean reference and one λ on the
    validation split, then the row): trained in this process, and by an external "scheduler"
    running the printed first wave plus two one-thread workers for the rest."""
    args = ["reproduce", "family-mnist10k", "--budget", "tiny", "--rows", "GN"]
    assert cli.main(args + ["--out", str(tmp_path / "one"), "--jobs", "1"]) == 0
    out = tmp_path / "two"
    capsys.readouterr()
    assert cli.main(args + ["--out", str(out), "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # the first wave: the sweep's clean reference and its λ point; the row waits for its λ
    assert len(lines) == 2 and all(" train --resume --out " in line and "/sweeps/runs/" in line for line in lines)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for line in lines:
        subprocess.run(line, shell=True, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    assert cli.main(args + ["--out", str(out), "--print-commands"]) == 0
    second = capsys.readouterr().out.strip().splitlines()
    assert len(second) == 1 and "/runs/gn" in second[0] and "/sweeps/" not in second[0]
    assert not (out / "results.json").exists()  # printing evaluates nothing
    assert cli.main(args + ["--out", str(out), "--jobs", "2"]) == 0  # trains the row as a one-thread worker
    assert (out / "runs" / "gn-lam1" / "sweep-run.log").is_file()  # it ran as a subprocess
    assert "It reused 2 of 3 trainings" in (out / "report.md").read_text()
    assert _outcomes(out) == _outcomes(tmp_path / "one")
    capsys.readouterr()
    assert cli.main(args + ["--out", str(out), "--print-commands"]) == 0
    assert capsys.readouterr().out == ""  # nothing left to train


@pytest.mark.slow
def test_reproduce_evaluations_in_one_thread_workers_give_the_outcomes_of_this_process(tmp_path: Path) -> None:
    """Two rows × two seeds of the family benchmark's tiny budget: evaluated in this process
    (``--eval-jobs 1``, the default) and by two spawned one-thread workers (``eval_jobs = 2``):
    the same outcomes, the workers' results counted as this invocation's, and a second
    invocation reuses all four."""
    args = ["reproduce", "family-mnist10k", "--budget", "tiny", "--rows", "clean", "FGSM-AT", "--seeds", "0", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(args + ["--out", str(one), "--eval-jobs", "1"]) == 0
    logs: list[str] = []
    from gradreg import reproduce

    reproduce.run_experiment("family-mnist10k", budget_name="tiny", out=two, rows=["clean", "FGSM-AT"], seeds=[0, 1],
                             eval_jobs=2, log=logs.append)
    assert "evaluating 4 model(s) as 2 one-thread workers" in logs
    assert sum(line.startswith("[") and " evaluated " in line for line in logs) == 4
    assert not any(" evaluating " in line for line in logs if line.startswith("["))  # none redone in this process
    assert "It reused" not in (two / "report.md").read_text()  # the workers' evaluations are this run's
    assert len(list((two / "evaluations").rglob("*.json"))) == 4
    outcomes = [{n: r["evals"] for n, r in json.loads((o / "results.json").read_text())["rows"].items()} for o in (one, two)]
    assert outcomes[0] == outcomes[1] and set(outcomes[0]) == {"clean", "FGSM-AT"}
    logs.clear()
    reproduce.run_experiment("family-mnist10k", budget_name="tiny", out=two, rows=["clean", "FGSM-AT"], seeds=[0, 1],
                             eval_jobs=2, log=logs.append)
    assert not any("one-thread workers" in line for line in logs)  # nothing left to train or evaluate
    assert "4 of 4 model evaluations" in (two / "report.md").read_text()


@pytest.mark.slow
def test_evaluation_workers_rebuild_a_users_batchnorm_module_from_its_run_folder(tmp_path: Path) -> None:
    """A user's own BatchNorm CNN (``byo_nets:small_bn_net``), two trainings: the workers rebuild
    it from its run folder and give every outcome of this process's evaluation of the loaded
    model (on one thread, as the workers); a worker that judged other weights would not."""
    import gradreg
    from gradreg.protocols import EvalSettings, cached_evaluation
    from gradreg.runner import EvalJob, Runner
    from gradreg.runs import load_run

    runs = [tmp_path / f"bn{seed}" for seed in (0, 1)]
    for seed, run in zip((0, 1), runs):
        gradreg.train(data="digits", model="byo_nets:small_bn_net", epochs=1, seed=seed, out=str(run), quiet=True,
                      log=lambda s: None)
    settings = EvalSettings(eps=[0.0, 0.05], attacks=("pgd",), pgd_steps=3, deepfool=False, n_test=60)
    jobs = [EvalJob(label=run.name, run_dir=str(run), device="cpu", data="digits", data_dir=None, settings=settings,
                    name=run.name, cache=str(tmp_path / "workers" / f"{run.name}.json")) for run in runs]
    assert Runner(eval_jobs=2, log=lambda s: None).evaluate(jobs) == 2
    bundle = data.load("digits")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job in jobs:
            model = load_run(job.run_dir, device="cpu").model
            assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 2
            here, _ = cached_evaluation(model, bundle, settings, cache=tmp_path / "here" / f"{job.name}.json",
                                        name=job.name)
            there = json.loads(Path(job.cache).read_text())["eval"]
            assert there == json.loads(json.dumps(here.to_dict()))  # every per-example outcome
    finally:
        torch.set_num_threads(previous)


def test_runner_evaluates_nothing_itself_with_one_job_or_one_evaluation_and_raises_a_workers_error() -> None:
    """The caller evaluates in its own process then (its threads, no worker's start); the
    default is one evaluation worker whatever the trainings' jobs; a worker's error stops it."""
    from gradreg.protocols import EvalSettings
    from gradreg.runner import EvalJob, Runner

    job = EvalJob(label="x", run_dir="missing", device="cpu", data="digits", data_dir=None, settings=EvalSettings(),
                  name="x", cache="missing.json")
    assert Runner(jobs=2, log=lambda s: None).evaluate([job, job]) == 0  # eval_jobs = 1 by default
    assert Runner(eval_jobs=2, log=lambda s: None).evaluate([job]) == 0
    with pytest.raises(ValueError, match="eval_jobs"):
        Runner(eval_jobs=0)
    with pytest.raises(Exception, match="is not a directory"):  # a worker's error reaches the caller
        Runner(eval_jobs=2, log=lambda s: None).evaluate([job, job])


def _fake_finish(points: list, curve: dict[float, tuple[float, float]], reference: tuple[float, float]) -> None:  # type: ignore[type-arg]
    """Write the metrics a finished validation run leaves, with the given (clean, PGD) per λ."""
    for p in points:
        clean, pgd = reference if p.role == "reference" else curve[round(p.lam, 6)]
        p.run_dir.mkdir(parents=True, exist_ok=True)
        (p.run_dir / "metrics.json").write_text(json.dumps({"validation_accuracy": clean, "validation_pgd_accuracy": pgd,
                                                            "train_seconds": 1.0}))


def test_reproduce_tuning_widens_a_rising_grid_round_by_round_from_the_run_folders(tmp_path: Path) -> None:
    """tune_rows' state on the family benchmark's GN row with widening on: read from run folders
    alone (here written by hand, no training), one λ added per round until the choice is interior."""
    from dataclasses import replace as dc_replace

    from gradreg import experiments
    from gradreg.reproduce import tuning_state

    exp = experiments.load("family-mnist10k").for_budget("tiny")
    budget = {**exp.budget("tiny"), "sweep_points": 3, "widen": True, "max_widen": 3}
    row = dc_replace(next(r for r in exp.rows if r.name == "GN"), lams=[0.1, 1.0, 10.0])
    # validation PGD accuracy peaks at λ = 1000: two rounds up (100, then 1000), then 10000 loses
    curve = {0.1: (0.98, 0.20), 1.0: (0.98, 0.30), 10.0: (0.98, 0.40), 100.0: (0.975, 0.50), 1000.0: (0.972, 0.60),
             10000.0: (0.971, 0.55)}
    grids = []
    for _ in range(5):
        state = tuning_state(exp, row, budget, tmp_path, None)
        if state.choice is not None:
            break
        grids.append(list(state.grid))
        _fake_finish([p for p in state.points if not (p.run_dir / "metrics.json").exists()], curve, (0.98, 0.10))
    assert grids == [[0.1, 1.0, 10.0], [0.1, 1.0, 10.0, 100.0], [0.1, 1.0, 10.0, 100.0, 1000.0],
                     [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]]
    choice = state.choice
    assert choice is not None and choice.lam == 1000.0 and choice.stop == "interior" and choice.source == "sweep"
    assert choice.grid == (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
    assert [c[0] for c in choice.curve] == list(choice.grid) and choice.curve[4][2] == 0.60
    record = json.loads((tmp_path / choice.record / "sweep.json").read_text())  # type: ignore[operator]
    assert record["chosen_lam"] == 1000.0 and record["extra"]["stop"] == "interior"
    assert record["extra"]["initial_grid"] == [0.1, 1.0, 10.0]
    # a clean-accuracy floor that λ = 10000 breaks changes nothing; one that 1000 breaks moves the choice
    budget2 = {**budget, "sweep_tolerance_points": 0.7}  # floor 0.973: 1000 (0.972) is not admissible
    assert tuning_state(exp, row, budget2, tmp_path, None).choice.lam == 100.0  # type: ignore[union-attr]
    # the same runs without widening: the sweep's own rule on the initial grid, its end flagged by the report
    plain = tuning_state(exp, row, {**budget, "widen": False}, tmp_path, None).choice
    assert plain is not None and plain.lam == 10.0 and plain.grid == (0.1, 1.0, 10.0) and plain.stop == ""


def test_a_grid_over_a_penalty_weight_and_added_terms_in_printed_commands(tmp_path: Path) -> None:
    from gradreg.config import apply_overrides, parse_set

    base = TrainConfig(method="arr", penalty={"eps": 0.1, "divergence": "kl"}, validation_fraction=0.2, validation_eps=0.1,
                       add=[{"method": "gn", "lam": None, "p": 2}])
    spec = SweepSpec(base=base, lams=[0.5, 2.0], out=tmp_path, lam_key="penalty.eps")
    points = sweep_points(spec)
    assert [p.config.penalty["eps"] for p in points[1:]] == [0.5, 2.0] and points[1].config.lam is None
    assert points[1].name.startswith("arr-lam0.5-") and points[2].name.startswith("arr-lam2-")
    items = config_overrides(points[2].config)  # the added term as an inline table, its default λ left out
    assert 'add=[{"method" = "gn", "p" = 2}]' in items
    again = apply_overrides(TrainConfig(), parse_set(items))
    assert again.add == points[2].config.add and again.penalty == points[2].config.penalty
    with pytest.raises(ConfigError, match="λ key"):
        SweepSpec(base=base, lams=[1.0], out=tmp_path, lam_key="epochs")


def test_runner_prints_a_shared_run_once_and_stops_on_a_failed_worker(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from gradreg.runner import Runner

    shared = TrainConfig(data="digits", model="mlp", epochs=1, out=str(tmp_path / "ref"))
    other = TrainConfig(data="digits", model="mlp", epochs=2, out=str(tmp_path / "other"))
    printer = Runner(print_only=True)
    assert printer.run([("a", shared), ("b", shared), ("c", other)]) == 2  # two rows' common reference: once
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines == printer.printed and not (tmp_path / "ref").exists()
    failing = Runner(jobs=2, launcher=[sys.executable, "-c", "import sys; sys.exit(3)"], log=lambda s: None)
    with pytest.raises(RuntimeError, match=r"2 training\(s\) failed: .*exit 3.*sweep-run.log"):
        failing.run([("a", shared), ("c", other)])
    assert (tmp_path / "ref" / "sweep-exit.txt").read_text().strip() == "3"
    with pytest.raises(ValueError, match="jobs"):
        Runner(jobs=0)


def test_run_names_of_an_earlier_version_are_kept() -> None:
    """Fields added later with a weight-neutral default (the overfitting monitor's) stay out of
    the run name's hash, so a reproduce folder written before them is reused. The two hashes
    were computed by the version before the monitor existed (commit d956f1b)."""
    from gradreg.sweep import config_hash

    assert config_hash(TrainConfig(method="gn", lam=1.0, data="digits", epochs=2)) == "060be398"
    assert config_hash(TrainConfig()) == "50c81835"
    assert config_hash(TrainConfig(monitor=False)) != "50c81835"  # off is not the default: a new name


def test_validation_scored_by_lrc_noise_matches_the_lrc_columns(tmp_path: Path) -> None:
    """``validation_attack = "lrc"`` scores the validation split under worst-of-k LRC noise (the
    SGR paper tunes λ at ζ = 8): at strength 0 it is the clean validation accuracy, and at 0.3 it
    equals what the evaluation layer's LRC columns (gradreg.protocols.lrc, σ_data from the
    training rows) compute on the same split and model."""
    from gradreg.protocols import EvalSettings
    from gradreg.protocols.lrc import lrc_curves, lrc_data_std
    from gradreg.runs import load_run

    def run(eps: float, name: str) -> dict:
        cfg = TrainConfig(data="digits", model="mlp", epochs=1, quiet=True, out=str(tmp_path / name), seed=3,
                          validation_fraction=0.2, validation_eps=eps, validation_attack="lrc",
                          validation_lrc_zeta_px=8.0, validation_lrc_samples=5)
        return train(cfg, log=lambda s: None)

    zero = run(0.0, "zero")
    assert "validation_pgd_accuracy" not in zero and zero["validation_attack"] == "lrc"
    assert zero["validation_lrc_accuracy"] == zero["validation_accuracy"]
    noisy = run(0.3, "noisy")
    assert noisy["validation_lrc_zeta_px"] == 8.0
    full = data.load("digits")
    rest, val = validation_indices(full.train_y, fraction=0.2)  # the split the run trained and scored on
    split = dataclasses.replace(full, train_x=full.train_x[rest], train_y=full.train_y[rest],
                                test_x=full.train_x[val], test_y=full.train_y[val])
    model = load_run(tmp_path / "noisy").model
    settings = EvalSettings(labels="true", seed=3, n_test=None, batch_size=500)  # the draws depend on the batching
    want = lrc_curves(model, split, zetas=[8.0], eps=[0.3], samples=5, settings=settings,
                      marginal_std=lrc_data_std(split))[8.0][0]
    assert noisy["validation_lrc_accuracy"] == pytest.approx(want, abs=1e-12)
    assert noisy["validation_lrc_accuracy"] < noisy["validation_accuracy"]  # the noise breaks some points
    with pytest.raises(ConfigError, match="validation_attack must be one of pgd, lrc"):
        TrainConfig(validation_attack="square").validate()


def test_sweep_records_point_at_their_runs_after_the_output_folder_moves(tmp_path: Path) -> None:
    """sweep.json names each run folder relative to itself (as reproduce lays them out: records in
    OUT/sweeps/NAME, runs in OUT/sweeps/runs), so a moved or published output folder still resolves."""
    import shutil

    from gradreg.config import TrainConfig
    from gradreg.sweep import SweepResult, SweepRow, write_records

    top = tmp_path / "first"
    runs = [top / "sweeps" / "runs" / n for n in ("ref", "a", "b")]
    for d in runs:
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"name": d.name}))
    rows = [SweepRow(name=d.name, role="point", lam=lam, eps=None, status="done", run_dir=str(d))
            for d, lam in zip(runs[1:], (0.1, 1.0))]
    ref = SweepRow(name="ref", role="reference", lam=None, eps=None, status="done", run_dir=str(runs[0]))
    result = SweepResult(spec={"method": "gn", "base": TrainConfig(validation_fraction=0.2, validation_eps=0.1).to_dict()},
                         rule="within-clean", tolerance_points=1.0, reference=ref,
                         rows=rows, chosen=rows[1], reason="test")
    write_records(result, top / "sweeps" / "gn")
    shutil.move(str(top), str(tmp_path / "moved"))
    folder = tmp_path / "moved" / "sweeps" / "gn"
    data = json.loads((folder / "sweep.json").read_text())
    named = [data["reference"], *data["rows"], data["chosen"]]
    assert [r["run_dir"] for r in named] == [os.path.join("..", "runs", n) for n in ("ref", "a", "b", "b")]
    assert [json.loads((folder / r["run_dir"] / "metrics.json").read_text())["name"] for r in named] == [
        "ref", "a", "b", "b"]
    assert result.rows[0].run_dir == str(runs[1])  # the result in memory keeps its own paths
