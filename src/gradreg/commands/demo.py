"""``gradreg demo``: the main job. Six methods of the family trained on the embedded digits
data set, evaluated white-box, with each method's training cost relative to clean."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..reproduce import run_experiment

HELP = "train clean, GN, SGR, DataGrad-L1, TRADES and PGD-AT on digits; evaluate; write report and plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="folder for the runs, report.md and plots (default demo-out)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    print("gradreg demo: training 6 methods on scikit-learn digits, then attacking each (about 10 minutes of one CPU core).")
    print(f"Finished runs in {out}/runs are reused; delete the folder to start over.\n")
    run_experiment("demo", budget_name="tiny", out=out)
    print(f"\nPlots: {out / 'pgd.png'}; full report: {out / 'report.md'}")
    return 0
