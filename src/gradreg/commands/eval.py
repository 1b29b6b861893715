"""``gradreg eval RUN... --out DIR``: white-box accuracy over an ε grid, ρ, masking checks."""
from __future__ import annotations

import argparse

from ..harness import evaluate_model
from ..report import fmt, markdown_table, plot_curves, write_csv, write_json
from .common import add_eval_arguments, add_record, add_run_arguments, check_same_data, is_writer, load_runs, output_dir, \
    settings_from_args, warn_checks

HELP = "evaluate runs: clean, noise, FGSM, PGD, targeted PGD over an ε grid; DeepFool ρ; masking checks"

LABELS = {"fgsm": "FGSM", "fgm": "FGM", "pgd": "PGD", "tpgd": "T-PGD", "tpgd-all": "T-PGD-all", "uniform": "rand", "gaussian": "gauss"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    add_eval_arguments(parser)
    parser.add_argument("--attacks", nargs="+", default=["fgsm", "pgd", "tpgd", "uniform"],
                        help="attacks over the grid (default: fgsm pgd tpgd uniform)")
    parser.add_argument("--autoattack-eps", metavar="EPS", help="also run AutoAttack at this ε (needs gradreg[autoattack])")
    parser.add_argument("--no-deepfool", action="store_true", help="skip DeepFool ρ")
    parser.add_argument("--no-raw-pgd", action="store_true",
                        help="let PGD carry successes over to larger ε (cheaper) instead of attacking every ε afresh; "
                             "the masking check 'accuracy falls with ε' then cannot see a raw PGD curve")


def run(args: argparse.Namespace) -> int:
    from ..threat import parse_eps

    runs = load_runs(args)
    data = check_same_data(runs)
    settings = settings_from_args(args, attacks=tuple(args.attacks), deepfool=not args.no_deepfool,
                                  raw_pgd=not args.no_raw_pgd,
                                  autoattack_eps=parse_eps(args.autoattack_eps) if args.autoattack_eps else None)
    for name in settings.attacks:
        settings.make_attack(name)  # unknown attack names fail before any work
    out = output_dir(args)
    results = []
    for r in runs:
        bundle = r.data(data_dir=args.data_dir)
        ev = evaluate_model(r.model, bundle, settings, name=r.name)
        warn_checks(ev)
        results.append(ev)
    if is_writer():
        write_eval_report(out, results, data=data, settings_desc=describe(settings, data))
        add_record(out / "results.json", args, n=min(settings.n_test or len(bundle.test_y), len(bundle.test_y)),
                   seeds=[settings.seed])
    return 0


def describe(settings, data: str) -> str:  # type: ignore[no-untyped-def]
    grid = settings.grid(data)
    return (f"{settings.norm} threat, ε grid {', '.join(f'{e:.4g}' for e in grid)} (input units), "
            f"PGD-{settings.pgd_steps} with random start, {settings.labels} labels, "
            f"{'all' if settings.n_test is None else f'first {settings.n_test}'} test points of {data}")


def eval_table(results: list) -> tuple[list[str], list[list[str]]]:  # type: ignore[type-arg]
    attacks = list(results[0].curves)
    header = ["run", "clean", *[f"{LABELS.get(a, a)} (avg)" for a in attacks], "ρ (DeepFool)", "checks"]
    rows = []
    for ev in results:
        failed = [c.name for c in ev.checks if not c.passed]
        rows.append([ev.name, fmt(ev.clean), *[fmt(ev.average(a)) for a in attacks],
                     fmt(ev.rho, percent=False) if ev.rho is not None else "–",
                     "ok" if not failed else "⚠ " + "; ".join(failed)])
    return header, rows


def write_eval_report(out, results: list, *, data: str, settings_desc: str) -> None:  # type: ignore[no-untyped-def,type-arg]
    header, rows = eval_table(results)
    table = markdown_table(header, rows)
    print(table)
    lines = [f"# Evaluation on {data}", "", settings_desc + ".",
             "Accuracies in %, averaged over the ε grid (the SGR paper's metric).", "", table, ""]
    per_eps = []
    for ev in results:
        for a, curve in ev.curves.items():
            per_eps += [[ev.name, a, e, acc] for e, acc in zip(ev.eps, curve)]
        for a, curve in ev.raw_curves.items():  # every ε attacked afresh (the masking check's curve)
            per_eps += [[ev.name, f"{a} (raw)", e, acc] for e, acc in zip(ev.eps, curve)]
    write_csv(out / "accuracy_per_eps.csv", ["run", "attack", "eps", "accuracy"], per_eps)
    write_csv(out / "summary.csv", header, rows)
    for a in results[0].curves:
        curves = {ev.name: (ev.eps, ev.curves[a]) for ev in results}
        plot_curves(out / f"accuracy_{a}.png", curves, title=f"{LABELS.get(a, a)} accuracy vs ε ({data})",
                    xlabel="ε (input units)")
        lines.append(f"![{a}](accuracy_{a}.png)")
    lines += ["", "## Gradient-masking checks", ""]
    for ev in results:
        for c in ev.checks:
            lines.append(f"- {ev.name}: {'ok' if c.passed else '**FAILED**'} — {c.name} ({c.detail})")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_json(out / "results.json", {"data": data, "settings": settings_desc, "runs": [ev.to_dict() for ev in results]})
    print(f"report: {out / 'report.md'}")
