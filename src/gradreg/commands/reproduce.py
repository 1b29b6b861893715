"""``gradreg reproduce EXPERIMENT --budget tiny|cpu|paper --out DIR``."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from .. import experiments
from ..reproduce import report_only, run_experiment

HELP = "reproduce a paper's table (experiments: " + ", ".join(experiments.names()) + ")"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help=f"one of: {', '.join(experiments.names())}")
    parser.add_argument("--budget", default="tiny", choices=experiments.BUDGETS,
                        help="tiny: digits, minutes; cpu: MNIST-10k on 2 cores, up to about 2 h "
                             "(each TOML says what it measured); paper: GPU "
                             "(paper-cifar10: the CIFAR-10 budget of experiments that have one)")
    parser.add_argument("--out", required=True, help="folder for the runs and report.md (re-running reuses finished runs)")
    parser.add_argument("--data-dir", help="data directory for the budget's data set")
    parser.add_argument("--rows", nargs="+", help="only these rows (names or slugs)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help="train every row once per seed and report mean ± spread with intervals "
                             "(default: the budget's seeds, else its seed)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild report.md, table.csv, results.json and the plots from the finished folder --out "
                             "(its results.json) without training or attacking")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="run independent trainings (sweep points, rows × seeds) as N parallel one-thread "
                             "worker processes; 1 trains in this process (default: the budget's jobs, else the "
                             "number of cores; 1 for tiny budgets, whose trainings take less than a worker's start)")
    parser.add_argument("--eval-jobs", type=int, metavar="N",
                        help="evaluate the rows × seeds as N parallel one-thread worker processes (default: the "
                             "budget's eval_jobs, else 1: in this process with its threads, which measured as fast "
                             "or faster on a 2-core machine; BENCHMARKS.md)")
    parser.add_argument("--print-commands", action="store_true",
                        help="train nothing: print the next wave of unfinished trainings as resumable shell "
                             "commands (for an external scheduler) and exit; run them, re-run this until it "
                             "prints nothing, then run without it to evaluate")
    parser.add_argument("--launcher", help="command that starts gradreg in printed/run commands "
                                           "(default: this Python with -m gradreg)")


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        if args.rows or args.seeds:
            raise ValueError("--report-only re-renders the stored rows and seeds: --rows and --seeds do not apply")
        report_only(args.experiment, budget_name=args.budget, out=Path(args.out))
        return 0
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be ≥ 1, got {args.jobs}")
    if args.eval_jobs is not None and args.eval_jobs < 1:
        raise ValueError(f"--eval-jobs must be ≥ 1, got {args.eval_jobs}")
    run_experiment(args.experiment, budget_name=args.budget, out=Path(args.out), data_dir=args.data_dir, rows=args.rows,
                   seeds=args.seeds, jobs=args.jobs, eval_jobs=args.eval_jobs, print_commands=args.print_commands,
                   launcher=shlex.split(args.launcher) if args.launcher else None)
    return 0
