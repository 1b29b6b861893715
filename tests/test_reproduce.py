"""The tiny reproduction and the demo run end to end (slow: a few minutes on 2 cores)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradreg import experiments, penalties
from gradreg.cli import main


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
