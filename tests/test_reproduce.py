"""The tiny reproduction and the demo run end to end (slow: a few minutes on 2 cores)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradreg import experiments, penalties
from gradreg.cli import main
from gradreg.penalties import noise_aug  # noqa: F401  (registers "lrc-aug" until penalties/__init__ imports it)
from gradreg.reproduce import LRC_DATA_COLUMN, lrc_column


def test_experiments_load_and_name_registered_methods() -> None:
    for name in experiments.names():
        exp = experiments.load(name)
        assert "tiny" in exp.budgets
        for row in exp.rows:
            penalties.make(row.method, **row.penalty)  # every row builds
        for paper_row, numbers in exp.paper.items():
            assert paper_row in {r.name for r in exp.rows}
            assert len(numbers) == len(exp.columns)
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.load("nope")


@pytest.mark.slow
def test_tiny_sgr_mnist_reproduction(tmp_path: Path) -> None:
    assert main(["reproduce", "sgr-mnist", "--budget", "tiny", "--out", str(tmp_path)]) == 0
    exp = experiments.load("sgr-mnist")
    result = json.loads((tmp_path / "results.json").read_text())
    assert list(result["rows"]) == [r.name for r in exp.rows]
    for name, row in result["rows"].items():
        assert list(row["cells"]) == exp.columns
        assert all(v is not None for v in row["cells"].values()), name
    report = (tmp_path / "report.md").read_text()
    assert "scikit-learn digits" in report and "(99.4)" in report  # paper numbers beside ours
    for r in exp.rows:
        assert f"| {r.name} |" in report
    pgd = {n: row["cells"]["PGD"] for n, row in result["rows"].items()}
    assert pgd["GN"] > pgd["clean"] and pgd["SGR"] > pgd["clean"]
    assert (tmp_path / "pgd.png").is_file() and (tmp_path / "transfer.png").is_file()


def test_lrc_columns_parse_and_the_experiment_declares_them() -> None:
    assert lrc_column("LRC ζ=4") == 4.0 and lrc_column("LRC ζ=0.5") == 0.5
    assert lrc_column(LRC_DATA_COLUMN) == "data" and lrc_column("PGD") is None and lrc_column("LRC ζ=") is None
    exp = experiments.load("lrc-cifar10")
    assert [r.name for r in exp.rows] == ["clean", "GN", "SGR", "LRC-augmented"]
    sgr = {r.name: r for r in experiments.load("sgr-cifar10").rows}
    assert all(r == sgr[r.name] for r in exp.rows[:3])  # the same rows as sgr-cifar10 (rows_from)
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
