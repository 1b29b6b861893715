"""Arguments and output shared by the evaluation commands (eval, transfer, lrc, analyze)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import distributed
from ..protocols import EvalSettings, ModelEval
from ..loading import parse_params
from .. import runs
from ..runs import ExternalModel, LoadedRun, external_model, parse_bounds, parse_shape
from ..threat import canonical_norm, parse_eps


def add_run_arguments(parser: argparse.ArgumentParser, *, many: bool = True) -> None:
    parser.add_argument("runs", nargs="*" if many else "?", metavar="RUN",
                        help="run directories from gradreg train (or a model given with --model)")
    parser.add_argument("--out", required=True, help="folder for report.md, results.json, CSV and plots")
    parser.add_argument("--data-dir", help="data directory, if not the one the run was trained with")
    add_device_argument(parser)
    add_model_arguments(parser)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 … (default auto)")


def add_model_arguments(parser: argparse.ArgumentParser, *, data_dir: bool = False) -> None:
    """Flags that name a model that is not a gradreg run (see :mod:`gradreg.loading`);
    ``data_dir`` adds ``--data-dir`` for commands that do not have it yet."""
    g = parser.add_argument_group("a model from anywhere (instead of, or besides, run directories)")
    if data_dir:
        g.add_argument("--data-dir", help="data directory, if not the one the run was trained with")
    g.add_argument("--model", metavar="SPEC",
                   help="package.module:factory, a registered model (gradreg list models) or robustbench:NAME")
    g.add_argument("--model-param", dest="model_params", metavar="KEY=VALUE", action="append", default=[],
                   help="factory parameter, a Python literal: --model-param depth=16")
    g.add_argument("--weights", metavar="FILE", help=".safetensors, or .pt/.pth (read with weights_only=True)")
    g.add_argument("--input-shape", metavar="C,H,W", help="the model's input shape (default: the data's)")
    g.add_argument("--bounds", metavar="LO,HI", help="the input domain (default: the data's, e.g. 0,1)")
    g.add_argument("--num-classes", type=int, metavar="K", help="the model's classes (default: the data's)")
    g.add_argument("--data", metavar="DATA",
                   help="test data for --model: a registered set, package.module:factory, an image folder, "
                        "or a .npz/.safetensors file with x and y")
    g.add_argument("--threat-model", default="Linf", help="RobustBench threat model: Linf, L2, corruptions")
    g.add_argument("--dataset", default="cifar10", help="RobustBench data set (default cifar10)")
    g.add_argument("--model-dir", default="models", help="RobustBench model folder (default ./models)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--norm", default="linf", help="threat norm: linf or l2 (default linf)")
    parser.add_argument("--eps", nargs="+", metavar="EPS",
                        help="ε grid, fractions allowed (8/255); default: the SGR paper's grid for the data set")
    parser.add_argument("--steps", type=int, default=40, help="PGD steps (default 40)")
    parser.add_argument("--n-test", "--limit", dest="n_test", type=int, help="evaluate the first N test points only")
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
                        batch_size=args.batch_size, labels=args.labels, seed=args.seed, **extra)  # type: ignore[arg-type]  # extra holds EvalSettings fields by name


def load_runs(args: argparse.Namespace) -> list[LoadedRun | ExternalModel]:
    """The run directories and the ``--model`` model of the command line, in that order."""
    distributed.init_from_env()
    check_model_arguments(args)
    raw = getattr(args, "runs", None)
    paths = [] if raw is None else raw if isinstance(raw, list) else [raw]
    # looked up at call time, so a test may stand in for gradreg.runs.load_run
    loaded: list[LoadedRun | ExternalModel] = [runs.load_run(p, device=args.device) for p in paths]
    if getattr(args, "model", None):
        loaded.append(load_external(args))
    if not loaded:
        raise ValueError("give a run directory, or a model with --model (and --weights, --data)")
    return loaded


def check_model_arguments(args: argparse.Namespace) -> None:
    """Model flags without --model are a mistake, not something to ignore silently."""
    if getattr(args, "model", None):
        return
    given = [flag for flag, dest in (("--weights", "weights"), ("--model-param", "model_params"),
                                     ("--input-shape", "input_shape"), ("--num-classes", "num_classes"))
             if getattr(args, dest, None)]
    if given:
        raise ValueError(f"{', '.join(given)} describe(s) a model given with --model; --model is missing")


def load_external(args: argparse.Namespace) -> ExternalModel:
    return external_model(args.model, params=parse_params(args.model_params), weights=args.weights,
                          data_spec=args.data, input_shape=parse_shape(args.input_shape),
                          bounds=parse_bounds(args.bounds), num_classes=args.num_classes, device=args.device,
                          threat_model=args.threat_model, dataset=args.dataset, model_dir=args.model_dir)


def check_same_data(runs: list[LoadedRun | ExternalModel]) -> str:
    data = {r.train_config["data"] for r in runs}
    if len(data) != 1:
        raise ValueError(f"runs were trained on different data sets ({', '.join(sorted(data))}); compare like with like")
    return data.pop()


def run_record(args: argparse.Namespace, *, n: int, seeds: list[int]) -> dict[str, object]:
    """What produced a results file: versions, the command, n test points, seeds, git commit."""
    import platform
    import shlex

    import torch

    from .. import __version__
    from ..trainio import git_commit

    argv = getattr(args, "_argv", None)
    argv = list(argv) if argv is not None else sys.argv[1:]
    return {"gradreg": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "command": shlex.join(["gradreg", *argv]), "n": int(n), "seeds": [int(s) for s in seeds],
            "git_commit": git_commit()}


def add_record(path: Path, args: argparse.Namespace, *, n: int, seeds: list[int]) -> None:
    """Add ``"record": run_record(...)`` to a results JSON file written by a command."""
    import json

    payload = json.loads(path.read_text())
    payload["record"] = run_record(args, n=n, seeds=seeds)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def output_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if distributed.rank_world()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
    return out


def is_writer() -> bool:
    return distributed.rank_world()[0] == 0


def warn_checks(ev: ModelEval) -> list[str]:
    """Failed masking checks as visible warnings on stderr; returns them for the report."""
    lines = [f"WARNING [{ev.name}] gradient-masking check failed: {c.name}: {c.detail}" for c in ev.checks if c.failed]
    if is_writer():
        for line in lines:
            print(line, file=sys.stderr)
    return lines
