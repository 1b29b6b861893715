"""``gradreg eval RUN... --out DIR``: white-box accuracy over an ε grid, ρ, masking checks."""
from __future__ import annotations

import argparse

from ..loading import parse_params
from ..protocols import EvalSettings, evaluate_model, masking_lines, masking_summary, standard_eps
from ..report import autoattack_text, fmt, fmt_interval, interval_columns, markdown_table, plot_curves, write_csv, write_json
from ..stats import Interval
from .common import add_eval_arguments, add_record, add_run_arguments, check_same_data, is_writer, load_runs, output_dir, \
    settings_from_args, warn_checks

HELP = "evaluate runs: clean, noise, FGSM, PGD, targeted PGD over an ε grid; DeepFool ρ; masking checks"

LABELS = {"fgsm": "FGSM", "fgm": "FGM", "pgd": "PGD", "tpgd": "T-PGD", "tpgd-all": "T-PGD-all", "uniform": "rand", "gaussian": "gauss"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    add_eval_arguments(parser)
    parser.add_argument("--attacks", nargs="+", default=["fgsm", "pgd", "tpgd", "uniform"],
                        help="attacks over the grid (default: fgsm pgd tpgd uniform)")
    parser.add_argument("--autoattack", action="store_true",
                        help="also run AutoAttack (needs gradreg[autoattack]) at the data set's standard ε "
                             "(8/255 CIFAR; 0.3 for the MNIST family, but never beyond the largest ε of the grid, "
                             "so 32/255 with the default grid) and at any --aa-eps")
    parser.add_argument("--aa-eps", "--autoattack-eps", dest="aa_eps", nargs="+", metavar="EPS",
                        help="AutoAttack radii besides the standard one (implies --autoattack)")
    parser.add_argument("--aa-version", default="standard",
                        help="AutoAttack version: standard, rand or plus (default standard)")
    parser.add_argument("--aa-n", type=int, metavar="N", help="run AutoAttack on the first N evaluated points only")
    parser.add_argument("--aa-after-pgd", action="store_true",
                        help="run AutoAttack only on the points PGD left standing (its column is then the worst "
                             "case of both; Square audits only the points both left standing)")
    parser.add_argument("--aa-param", dest="aa_params", metavar="KEY=VALUE", action="append", default=[],
                        help="AutoAttack budget, a Python literal: --aa-param n_iter=20 --aa-param n_queries=500 "
                             "(also n_restarts; the package's own settings for the version when not given)")
    parser.add_argument("--no-deepfool", action="store_true", help="skip DeepFool ρ")
    parser.add_argument("--no-raw-pgd", action="store_true",
                        help="let PGD carry successes over to larger ε (cheaper) instead of attacking every ε afresh; "
                             "the masking check 'accuracy falls with ε' then cannot see a raw PGD curve")


def run(args: argparse.Namespace) -> int:
    from ..threat import parse_eps

    from ..protocols import AA_VERSIONS

    if args.aa_version not in AA_VERSIONS:  # before any model or data is read
        raise ValueError(f"--aa-version must be one of {', '.join(AA_VERSIONS)}, got {args.aa_version!r}")
    runs = load_runs(args)
    data = check_same_data(runs)
    if args.aa_n is not None and args.aa_n < 1:
        raise ValueError(f"--aa-n must be ≥ 1, got {args.aa_n}")
    use_aa = args.autoattack or bool(args.aa_eps)
    out = output_dir(args)
    settings = settings_from_args(args, attacks=tuple(args.attacks), deepfool=not args.no_deepfool,
                                  raw_pgd=not args.no_raw_pgd, autoattack=use_aa, aa_version=args.aa_version,
                                  aa_n=args.aa_n, aa_after_pgd=args.aa_after_pgd,
                                  aa_cache=str(out / "autoattack") if use_aa else None)
    if args.aa_params:
        settings.aa_params = parse_params(args.aa_params, flag="--aa-param")
    if use_aa:  # the standard ε first, then the listed ones
        extra = [parse_eps(e) for e in args.aa_eps or []]
        settings.aa_eps = list(dict.fromkeys([default_aa_eps(data, settings), *extra]))
        settings.make_autoattack()  # a missing package fails before any work
    for name in settings.attacks:
        settings.make_attack(name)  # unknown attack names fail before any work
    results = []
    for r in runs:
        bundle = r.data(data_dir=args.data_dir)
        ev = evaluate_model(r.model, bundle, settings, name=r.name)
        warn_checks(ev)
        results.append(ev)
    if is_writer():
        write_eval_report(out, results, data=data, settings_desc=describe(settings, data))
        add_record(out / "results.json", args, n=min(settings.n_test or len(bundle.test_y), len(bundle.test_y)),
                   seeds=[settings.seed], autoattack=use_aa)
    return 0


def default_aa_eps(data: str, settings: EvalSettings) -> float:
    """The data set's standard AutoAttack ε, capped at the largest ε of the evaluation grid (our
    choice: 0.3 on digits lies beyond the SGR paper's [0, 32/255] grid, where every model of the
    family reads 0 %, and AutoAttack is there to check the grid's PGD numbers)."""
    grid = settings.grid(data)
    top = max(grid) if grid else 0.0
    standard = standard_eps(data, settings.norm)
    return standard if top <= 0 or standard <= top else top


def describe(settings, data: str) -> str:
    grid = settings.grid(data)
    return (f"{settings.norm} threat, ε grid {', '.join(f'{e:.4g}' for e in grid)} (input units), "
            f"PGD-{settings.pgd_steps} with random start, {settings.labels} labels, "
            f"{'all' if settings.n_test is None else f'first {settings.n_test}'} test points of {data}")


def aa_radii(results: list) -> list[float]:
    """The AutoAttack radii of the evaluation (the same for every run)."""
    return [a["eps"] for a in (results[0].autoattack or [])]


def eval_table(results: list) -> tuple[list[str], list[list[str]], list[str], list[list[object]]]:
    """(Markdown header, Markdown rows, CSV header, CSV rows): every accuracy with its 95 % interval."""
    attacks = list(results[0].curves)
    aa_eps = aa_radii(results)
    pgd_at = [f"PGD ε={e:.4g}" for e in aa_eps] if aa_eps else []
    aa_names = [f"AutoAttack ε={e:.4g}" for e in aa_eps]
    header = ["run", "n", "clean", *[f"{LABELS.get(a, a)} (avg)" for a in attacks],
              *[c for pair in zip(pgd_at, aa_names) for c in pair], "ρ (DeepFool)", "checks"]
    csv_header = ["run", "n", *interval_columns("clean"), *[c for a in attacks for c in interval_columns(f"{a}_avg")],
                  *[c for e in aa_eps for c in (*interval_columns(f"pgd_eps{e:.4g}"), *interval_columns(f"autoattack_eps{e:.4g}"),
                                                 f"autoattack_eps{e:.4g}_n")],
                  "rho", "checks"]
    rows, csv_rows = [], []
    for ev in results:
        checks = masking_summary(ev.checks)
        aa_cells, aa_csv = [], []
        for entry in ev.autoattack or []:
            pgd_iv, aa_iv = (Interval(**entry["pgd_interval"]), Interval(**entry["interval"]))
            aa_cells += [fmt_interval(pgd_iv), fmt_interval(aa_iv)]
            aa_csv += [pgd_iv.value, pgd_iv.lo, pgd_iv.hi, aa_iv.value, aa_iv.lo, aa_iv.hi, entry["n"]]
        clean_iv = ev.clean_interval()
        avg = [ev.average_interval(a) for a in attacks]
        rows.append([ev.name, str(ev.n), fmt_interval(clean_iv), *[fmt_interval(iv) for iv in avg], *aa_cells,
                     fmt(ev.rho, percent=False) if ev.rho is not None else "–", checks])
        csv_rows.append([ev.name, ev.n, *_triple(clean_iv), *[v for iv in avg for v in _triple(iv)], *aa_csv,
                         ev.rho, checks])
    return header, rows, csv_header, csv_rows


def _triple(iv) -> tuple[float | None, float | None, float | None]:
    return (iv.value, iv.lo, iv.hi) if iv is not None else (None, None, None)


def write_eval_report(out, results: list, *, data: str, settings_desc: str) -> None:
    header, rows, csv_header, csv_rows = eval_table(results)
    table = markdown_table(header, rows)
    print(table)
    lines = [f"# Evaluation on {data}", "", settings_desc + ".",
             "Accuracies in %, averaged over the ε grid (the SGR paper's metric), each with its 95 % interval "
             "[lo, hi] on the n test points (Wilson; for a grid average the Wilson interval at its mean, see "
             "gradreg.stats). Two runs differ only where a paired test on the same points says so, not where "
             "their intervals merely fail to overlap.", "", table, ""]
    for ev in results:
        for entry in ev.autoattack or []:
            lines.append(f"{ev.name} at ε={entry['eps']:.4g}: {autoattack_text(entry['run'], entry['n'])}; "
                         f"{entry['paired']['test']} against PGD, p = {entry['paired']['p_value']:.2g}.")
    per_eps = []
    for ev in results:
        for a, curve in ev.curves.items():
            ivs = ev.curve_intervals(a) or [None] * len(curve)
            per_eps += [[ev.name, a, e, acc, ev.n, *_triple(iv)[1:]] for e, acc, iv in zip(ev.eps, curve, ivs)]
        for a, curve in ev.raw_curves.items():  # every ε attacked afresh (the masking check's curve)
            per_eps += [[ev.name, f"{a} (raw)", e, acc, ev.n, None, None] for e, acc in zip(ev.eps, curve)]
        for entry in ev.autoattack or []:
            per_eps.append([ev.name, "autoattack", entry["eps"], entry["accuracy"], entry["n"],
                            entry["interval"]["lo"], entry["interval"]["hi"]])
    write_csv(out / "accuracy_per_eps.csv", ["run", "attack", "eps", "accuracy", "n", "lo", "hi"], per_eps)
    write_csv(out / "summary.csv", csv_header, csv_rows)
    for a in results[0].curves:
        curves = {ev.name: (ev.eps, ev.curves[a]) for ev in results}
        bands = {ev.name: ([iv.lo for iv in ivs], [iv.hi for iv in ivs])
                 for ev in results if (ivs := ev.curve_intervals(a))}
        points = {}
        if a == "pgd":  # AutoAttack beside PGD, with its interval as an error bar
            points = {f"{ev.name} AutoAttack": ([e["eps"] for e in ev.autoattack], [e["accuracy"] for e in ev.autoattack],
                                                [e["interval"]["lo"] for e in ev.autoattack],
                                                [e["interval"]["hi"] for e in ev.autoattack])
                      for ev in results if ev.autoattack}
        plot_curves(out / f"accuracy_{a}.png", curves, title=f"{LABELS.get(a, a)} accuracy vs ε ({data}), 95 % bands",
                    xlabel="ε (input units)", bands=bands, points=points)
        lines.append(f"![{a}](accuracy_{a}.png)")
    lines += ["", *masking_lines([(ev.name, ev.checks) for ev in results])]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_json(out / "results.json", {"data": data, "settings": settings_desc, "runs": [ev.to_dict() for ev in results]})
    print(f"report: {out / 'report.md'}")
