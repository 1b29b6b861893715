"""Arguments and output shared by the evaluation commands (eval, transfer, lrc, analyze)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import distributed
from ..harness import EvalSettings, ModelEval
from ..runs import LoadedRun, load_run
from ..threat import canonical_norm, parse_eps


def add_run_arguments(parser: argparse.ArgumentParser, *, many: bool = True) -> None:
    parser.add_argument("runs", nargs="+" if many else None, metavar="RUN", help="run directories from gradreg train")
    parser.add_argument("--out", required=True, help="folder for report.md, results.json, CSV and plots")
    parser.add_argument("--data-dir", help="data directory, if not the one the run was trained with")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--norm", default="linf", help="threat norm: linf or l2 (default linf)")
    parser.add_argument("--eps", nargs="+", metavar="EPS",
                        help="ε grid, fractions allowed (8/255); default: the SGR paper's grid for the data set")
    parser.add_argument("--steps", type=int, default=40, help="PGD steps (default 40)")
    parser.add_argument("--n-test", type=int, help="evaluate the first N test points only")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--labels", default="predicted", choices=("predicted", "true"),
                        help="attack the predicted label (default, no label leaking) or the true one")
    parser.add_argument("--seed", type=int, default=0)


def settings_from_args(args: argparse.Namespace, **extra: object) -> EvalSettings:
    eps = [parse_eps(e) for e in args.eps] if args.eps else None
    if args.steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {args.steps}")
    if args.n_test is not None and args.n_test < 1:
        raise ValueError(f"--n-test must be ≥ 1, got {args.n_test}")
    return EvalSettings(norm=canonical_norm(args.norm), eps=eps, pgd_steps=args.steps, n_test=args.n_test,
                        batch_size=args.batch_size, labels=args.labels, seed=args.seed, **extra)  # type: ignore[arg-type]


def load_runs(args: argparse.Namespace) -> list[LoadedRun]:
    distributed.init_from_env()
    paths = args.runs if isinstance(args.runs, list) else [args.runs]
    return [load_run(p, device=args.device) for p in paths]


def check_same_data(runs: list[LoadedRun]) -> str:
    data = {r.train_config["data"] for r in runs}
    if len(data) != 1:
        raise ValueError(f"runs were trained on different data sets ({', '.join(sorted(data))}); compare like with like")
    return data.pop()


def output_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if distributed.rank_world()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
    return out


def is_writer() -> bool:
    return distributed.rank_world()[0] == 0


def warn_checks(ev: ModelEval) -> list[str]:
    """Failed masking checks as visible warnings on stderr; returns them for the report."""
    lines = [f"WARNING [{ev.name}] gradient-masking check failed: {c.name}: {c.detail}" for c in ev.checks if not c.passed]
    if is_writer():
        for line in lines:
            print(line, file=sys.stderr)
    return lines
