"""``gradreg sweep``: tune λ (and ε) of one method on a validation split carved from the training data."""
from __future__ import annotations

import argparse
import shlex

from ..config import ConfigError
from ..sweep import (DEFAULT_VALIDATION_FRACTION, RULES, SweepSpec, gather, is_finished, point_command,
                     run_points, sweep_points, write_records)
from .train import config_from_args, add_config_arguments

HELP = "tune λ over a grid on a validation split (never the test set); resumable, one gradreg train per point"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)  # the base configuration; --out is the sweep's folder
    parser.add_argument("--lams", type=float, nargs="+", required=True, metavar="LAM", help="the λ grid")
    parser.add_argument("--eps-values", type=float, nargs="+", metavar="EPS",
                        help="also sweep the method's ε over these values (set through --eps-key)")
    parser.add_argument("--eps-key", default="penalty.eps", help="configuration key of the method's ε (default penalty.eps)")
    parser.add_argument("--rule", default="within-clean", choices=tuple(RULES),
                        help="how λ is picked (default within-clean: best validation PGD accuracy whose clean "
                             "accuracy is within --tolerance-points of the clean model's, as the SGR paper)")
    parser.add_argument("--tolerance-points", type=float, default=1.0,
                        help="allowed clean-accuracy drop in percentage points (default 1)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="run unfinished points as N parallel processes")
    parser.add_argument("--print-commands", action="store_true",
                        help="print one shell command per unfinished point (for an external scheduler) and exit")
    parser.add_argument("--gather", action="store_true", help="run nothing: only collect what has finished")
    parser.add_argument("--launcher", help="command that starts gradreg in printed/run commands "
                                           "(default: this Python with -m gradreg)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.validation_fraction <= 0:
        cfg.validation_fraction = DEFAULT_VALIDATION_FRACTION
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {args.jobs}")
    spec = SweepSpec(base=cfg.validate(), lams=args.lams, out=cfg.out, eps_values=args.eps_values,
                     eps_key=args.eps_key.replace("-", "_"), rule=args.rule, tolerance_points=args.tolerance_points)
    points = sweep_points(spec)
    launcher = shlex.split(args.launcher) if args.launcher else None
    if args.print_commands:
        for p in points:
            if not is_finished(p):
                print(point_command(p, launcher=launcher))
        return 0
    if not args.gather:
        run_points(points, jobs=args.jobs, launcher=launcher)
    result = gather(spec, points)
    paths = write_records(result, spec.out)
    pending = sum(r.status != "done" for r in [result.reference, *result.rows])
    chosen = (f"λ = {result.chosen.lam:g}" + (f", ε = {result.chosen.eps:g}" if result.chosen.eps is not None else "")
              if result.chosen else "none")
    print(f"{cfg.method}: chosen {chosen} ({result.rule}: {result.reason}); "
          f"{pending} of {len(points)} run(s) unfinished -> {paths['markdown']}")
    return 0
