"""``gradreg transfer RUN... --out DIR``: source × target matrix of PGD transfer accuracy."""
from __future__ import annotations

import argparse

from ..protocols import transfer_matrix
from ..report import markdown_table, plot_matrix, write_csv, write_json
from .common import add_eval_arguments, add_record, add_run_arguments, check_same_data, is_writer, load_runs, output_dir, \
    mean_cell, settings_from_args

HELP = "PGD transfer matrix: examples crafted on each source run, judged on each target run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    add_eval_arguments(parser)


def run(args: argparse.Namespace) -> int:
    runs = load_runs(args)
    data = check_same_data(runs)
    settings = settings_from_args(args)
    out = output_dir(args)
    bundle = runs[0].data(data_dir=args.data_dir)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run folders need distinct names, got {names}")
    matrix = transfer_matrix({r.name: r.model for r in runs}, bundle, settings)
    avg = [[sum(matrix[s][t]) / len(matrix[s][t]) for t in names] for s in names]
    if not is_writer():
        return 0
    n = min(settings.n_test or len(bundle.test_y), len(bundle.test_y))
    header = ["source ↓ / target →", *names]
    rows = [[s, *[mean_cell(v, n) for v in row]] for s, row in zip(names, avg)]
    table = markdown_table(header, rows)
    print(table)
    print(f"accuracy % [95 % Wilson interval at the mean] on n = {n} test points, averaged over the ε grid")
    grid = settings.grid(data)
    write_csv(out / "transfer.csv", ["source", "target", "eps", "accuracy"],
              [[s, t, e, a] for s in names for t in names for e, a in zip(grid, matrix[s][t])])
    plot_matrix(out / "transfer.png", avg, rows=names, cols=names, title=f"PGD transfer accuracy, avg over ε ({data})",
                xlabel="target model", ylabel="source model")
    (out / "report.md").write_text(
        f"# PGD transfer on {data}\n\nAccuracy (%) of each target on PGD-{settings.pgd_steps} examples crafted on "
        f"each source, averaged over ε ∈ {{{', '.join(f'{e:.4g}' for e in grid)}}} ({settings.norm}), on n = {n} "
        f"test points, with the 95 % Wilson interval at the mean [lo, hi]. The diagonal is white-box.\n\n{table}\n\n![transfer](transfer.png)\n")
    write_json(out / "results.json", {"data": data, "eps": grid, "matrix": matrix})
    add_record(out / "results.json", args, n=n, seeds=[settings.seed])
    return 0
