"""``gradreg lrc RUN... --out DIR``: accuracy under worst-of-k long-range-correlated noise."""
from __future__ import annotations

import argparse

from ..attacks.lrc import DEFAULT_LRC_SCALE, LRC_SCALES
from ..protocols import EvalSettings, lrc_curves, lrc_data_std
from ..report import markdown_table, plot_curves, write_csv, write_json
from ..threat import parse_eps
from .common import add_record, add_run_arguments, check_same_data, is_writer, load_runs, mean_cell, output_dir

HELP = "accuracy under long-range-correlated Gaussian noise (SGR paper) as a function of ζ and ε"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--zeta", nargs="+", type=float, default=[1, 2, 4, 8, 16], help="decay lengths ζ in pixels")
    parser.add_argument("--eps", nargs="+", default=["0", "0.1", "0.2", "0.3"], help="noise strengths ε")
    parser.add_argument("--samples", type=int, default=100, help="worst-of-k copies (default 100)")
    parser.add_argument("--scale", choices=LRC_SCALES, default=DEFAULT_LRC_SCALE,
                        help=f"noise scale s in x + ε·s·ξ: 'data' is the square root of the training inputs' mean "
                             f"per-pixel variance, 'unit' is 1 (default {DEFAULT_LRC_SCALE!r}, the same as the "
                             f"lrc-cifar10 experiment's)")
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.samples < 1:
        raise ValueError(f"--samples must be ≥ 1, got {args.samples}")
    if any(z <= 0 for z in args.zeta):
        raise ValueError("--zeta values must be > 0")
    eps = [parse_eps(e) for e in args.eps]
    runs = load_runs(args)
    data = check_same_data(runs)
    out = output_dir(args)
    settings = EvalSettings(n_test=args.n_test, batch_size=args.batch_size, seed=args.seed)
    results = {}
    for r in runs:
        bundle = r.data(data_dir=args.data_dir)
        std = lrc_data_std(bundle) if args.scale == "data" else 1.0
        results[r.name] = lrc_curves(r.model, bundle, zetas=args.zeta, eps=eps, samples=args.samples,
                                     settings=settings, marginal_std=std)
    if not is_writer():
        return 0
    scale_text = ("s = σ_data, the square root of the training inputs' mean per-pixel variance"
                  if args.scale == "data" else "s = 1")
    n = min(args.n_test or len(bundle.test_y), len(bundle.test_y))
    header = ["run", *[f"ζ={z:g}" for z in args.zeta]]
    rows = [[name, *[mean_cell(sum(c[z]) / len(c[z]), n) for z in c]] for name, c in results.items()]
    table = markdown_table(header, rows)
    print(table)
    print(f"accuracy % [95 % Wilson interval at the mean] on n = {n} test points, averaged over ε")
    write_csv(out / "lrc.csv", ["run", "zeta", "eps", "accuracy"],
              [[n, z, e, a] for n, c in results.items() for z, accs in c.items() for e, a in zip(eps, accs)])
    plots = []
    for e_idx, e in enumerate(eps):
        if e == 0:
            continue
        curves = {n: (list(c), [c[z][e_idx] for z in c]) for n, c in results.items()}
        name = f"lrc_eps{e_idx}.png"
        plot_curves(out / name, curves, title=f"LRC worst-of-{args.samples}, ε = {e:g} ({data})",
                    xlabel="decay length ζ (pixels)", logx=True)
        plots.append(f"![lrc ε={e:g}]({name})")
    (out / "report.md").write_text(
        f"# Long-range-correlated noise on {data}\n\nAccuracy (%) under worst-of-{args.samples} LRC noise "
        f"(x + ε·s·ξ, {scale_text}), "
        f"averaged over ε ∈ {{{', '.join(f'{e:g}' for e in eps)}}}, per decay length ζ, on n = {n} test points, "
        f"with the 95 % Wilson interval at the mean [lo, hi].\n\n{table}\n\n" + "\n".join(plots) + "\n")
    write_json(out / "results.json", {"data": data, "eps": eps, "samples": args.samples, "scale": args.scale,
                                      "results": {n: {str(z): a for z, a in c.items()} for n, c in results.items()}})
    add_record(out / "results.json", args, n=min(args.n_test or len(bundle.test_y), len(bundle.test_y)),
               seeds=[args.seed])
    return 0
