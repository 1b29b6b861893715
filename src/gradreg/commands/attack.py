"""``gradreg attack RUN_DIR``: robust accuracy of a trained run under one attack and a list of ε.

Example::

    gradreg attack runs/sgr --attack pgd --norm linf --eps 0 0.05 0.1 8/255 --steps 40 --json pgd.json

prints a table and, with ``--json``, writes
``{"clean_accuracy": a, "clean": {...}, "n": n, "results": [{"attack": .., "norm": .., "eps": e,
"accuracy": r, "n": n, "lo": .., "hi": ..}, ...], "record": {..., "attack": {"package": ..,
"package_version": ..}}}`` (accuracies are fractions, lo/hi their 95 % Wilson interval).
The evaluation goes through :func:`gradreg.judge.evaluate_attack`, which re-checks and
re-judges every adversarial example.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
from pathlib import Path
from typing import Any

HELP = "robust accuracy of a trained run under an attack, for a list of ε"

# flag dest → attack factory parameter (passed only when given and accepted by the attack)
_PARAM_FLAGS = {"steps": "steps", "rel_stepsize": "rel_stepsize", "random_start": "random_start",
                "samples": "samples", "zeta_px": "zeta_px", "seed": "seed", "aa_version": "version",
                "bn_policy": "bn_policy", "sweep": "sweep"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .common import add_model_arguments

    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="?",
                        help="a finished run (config.json + model.safetensors), or a model given with --model")
    parser.add_argument("--attack", default="pgd", help="registered attack name (see `gradreg list attacks`)")
    parser.add_argument("--norm", default="linf", help="threat norm: linf, l2 or l1 (default: linf)")
    parser.add_argument("--eps", nargs="+", required=True, metavar="EPS",
                        help="radii in input units, fractions allowed: --eps 0 0.1 8/255")
    parser.add_argument("--labels", choices=("predicted", "true"), default="predicted",
                        help="attack the predicted label (default, no label leaking) or the true one")
    parser.add_argument("--steps", type=int, default=None, help="iterations (pgd, tpgd)")
    parser.add_argument("--rel-stepsize", dest="rel_stepsize", type=float, default=None,
                        help="step size relative to ε (pgd, tpgd; default 2.5/steps)")
    parser.add_argument("--random-start", dest="random_start", action=argparse.BooleanOptionalAction,
                        default=None, help="random start in the ball (pgd, tpgd; default on)")
    parser.add_argument("--sweep", choices=("fast", "carry"), default=None,
                        help="several radii (pgd): fast = per-example bisection with warm starts (default), "
                             "carry = every still-robust input attacked afresh at every radius")
    parser.add_argument("--samples", type=int, default=None, help="worst-of-k copies (lrc, uniform, gaussian)")
    parser.add_argument("--zeta-px", dest="zeta_px", type=float, default=None, help="LRC decay length in pixels")
    parser.add_argument("--seed", type=int, default=None, help="seed of random attacks")
    parser.add_argument("--aa-version", dest="aa_version", default=None,
                        help="AutoAttack version: standard, plus, rand (autoattack)")
    parser.add_argument("--bn-policy", dest="bn_policy", choices=("eval", "train", "frozen"), default=None,
                        help="mode the model runs in during the attack (default: eval)")
    parser.add_argument("--param", dest="params", metavar="KEY=VALUE", action="append", default=[],
                        help="any other attack parameter, e.g. --param overshoot=0.05")
    parser.add_argument("--limit", "--n-test", dest="limit", type=int, default=None,
                        help="attack only the first N test images")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: only on a terminal)")
    parser.add_argument("--json", dest="json_file", metavar="FILE", default=None, help="write the results as JSON")
    add_model_arguments(parser, data_dir=True)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def attack_params(args: argparse.Namespace) -> dict[str, Any]:
    """The attack factory's keyword arguments given on the command line, checked against it."""
    from ..attacks import ATTACKS

    factory = ATTACKS.get(args.attack)  # UnknownNameError lists the known names
    accepted = set(inspect.signature(factory).parameters)
    params: dict[str, Any] = {"labels": args.labels}
    for dest, name in _PARAM_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            params[name] = value
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        params[key.strip().replace("-", "_")] = _literal(value.strip())
    if args.aa_version is not None:
        from ..protocols import AA_VERSIONS

        if args.aa_version not in AA_VERSIONS:
            raise ValueError(f"--aa-version must be one of {', '.join(AA_VERSIONS)}, got {args.aa_version!r}")
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"attack {args.attack!r} has no parameter {', '.join(unknown)} "
                         f"(it takes: {', '.join(sorted(accepted))})")
    return params


def format_table(rows: list[dict[str, Any]], clean: dict[str, Any]) -> str:
    """Accuracies in % with their 95 % Wilson intervals, and n."""
    lines = [f"{'attack':<12} {'norm':<5} {'eps':>10} {'accuracy % [95 % interval]':>28} {'n':>6}"]
    for r in rows:
        lines.append(f"{r['attack']:<12} {r['norm']:<5} {r['eps']:>10.6g} {_cell(r):>28} {r['n']:>6}")
    lines.append(f"clean accuracy {_cell(clean)} (n = {clean['n']}, 95 % Wilson interval)")
    return "\n".join(lines)


def _cell(entry: dict[str, Any]) -> str:
    return f"{100 * entry['accuracy']:.1f} [{100 * entry['lo']:.1f}, {100 * entry['hi']:.1f}]"


def with_interval(accuracy: float, n: int) -> dict[str, Any]:
    """``{"accuracy", "n", "lo", "hi"}``: the accuracy with its 95 % Wilson interval."""
    from ..stats import wilson_interval

    lo, hi = wilson_interval(round(accuracy * n), n)
    return {"accuracy": accuracy, "n": n, "lo": lo, "hi": hi}


def attack_package(attack: Any) -> dict[str, Any]:
    """Which code ran the attack: the AutoAttack package and its version, or gradreg's own."""
    from .. import __version__

    describe = getattr(attack, "describe", None)
    if callable(describe):
        return dict(describe())
    return {"package": "gradreg", "package_version": __version__}


def run(args: argparse.Namespace) -> int:
    from .. import attacks
    from .. import distributed
    from ..inference import accuracy
    from ..judge import robust_accuracy
    from ..threat import ThreatModel, canonical_norm, check_eps_fits, parse_eps

    norm = canonical_norm(args.norm)
    eps_list = [parse_eps(e) for e in args.eps]
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be ≥ 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    attack = attacks.make(args.attack, **attack_params(args))
    if norm not in attack.norms:  # fail before loading anything
        raise ValueError(f"attack {attack.name!r} supports norms {', '.join(attack.norms)}, not {norm!r}")

    from .common import load_runs

    args.runs = [args.run_dir] if args.run_dir else []
    sources = load_runs(args)
    if len(sources) != 1:
        raise ValueError("attack takes one model: a run directory or --model, not both")
    loaded = sources[0]
    bundle = loaded.data(data_dir=args.data_dir)
    x, y = bundle.test_x, bundle.test_y
    if args.limit is not None:
        x, y = x[:args.limit], y[:args.limit]
    for e in eps_list:
        check_eps_fits(e, norm, bundle.bounds, x[0].numel())
    threat = ThreatModel(norm, 0.0, bundle.bounds)
    # under torchrun every rank attacks its share of the batches and the results are gathered
    accs = robust_accuracy(loaded.model, x, y, attack, threat, eps_list, batch_size=args.batch_size,
                           progress=args.progress)
    clean = accuracy(loaded.model, x, y, batch_size=args.batch_size)
    n = len(y)
    rows = [{"attack": attack.name, "norm": norm, "eps": e, **with_interval(a, n)} for e, a in zip(eps_list, accs)]
    clean_entry = with_interval(clean, n)
    if distributed.rank_world()[0] != 0:
        return 0
    print(f"{Path(args.run_dir).name if args.run_dir else loaded.name}: {attack.name} ({norm}, labels={args.labels}) on {len(y)} test images "
          f"of {bundle.name}")
    print(format_table(rows, clean_entry))
    if args.json_file:
        out = Path(args.json_file)
        if out.parent and not out.parent.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
        from .common import run_record

        record = run_record(args, n=len(y), seeds=[args.seed if args.seed is not None else 0])
        record["attack"] = attack_package(attack)
        out.write_text(json.dumps({"clean_accuracy": clean, "clean": clean_entry, "n": n, "results": rows,
                                   "record": record}, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0
