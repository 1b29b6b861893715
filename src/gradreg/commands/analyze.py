"""``gradreg analyze RUN --out DIR``: covariance function of PGD perturbations (and its decay
length) next to the data's, and the softmax along clean → adversarial lines."""
from __future__ import annotations

import argparse

from ..analysis import perturbation_covariance, softmax_along_line
from ..protocols import test_subset
from ..report import _pyplot, markdown_table, plot_curves, write_json
from ..threat import check_eps_fits, parse_eps
from .common import add_eval_arguments, add_record, add_run_arguments, is_writer, load_runs, output_dir, settings_from_args

HELP = "covariance function of a model's PGD perturbations vs the data's; softmax along adversarial lines"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, many=False)
    add_eval_arguments(parser)
    parser.add_argument("--at-eps", default=None, help="PGD radius for the perturbations (default: the grid's middle)")
    parser.add_argument("--examples", type=int, default=4, help="examples in the smoothness plot")
    parser.add_argument("--norms", action="store_true",
                        help="also the per-example ‖∇ₓL‖₁, ‖∇ₓL‖₂ and ‖J(x)‖_{p,q} on the test points (table + norms.png)")
    parser.add_argument("--opnorm-p", help="p of ‖J(x)‖_{p,q} (default: the run's penalty.norm, else l2)")
    parser.add_argument("--opnorm-q", help="q of ‖J(x)‖_{p,q} (default: the run's penalty.out_norm, else l2)")


def run(args: argparse.Namespace) -> int:
    sources = load_runs(args)
    if len(sources) != 1:
        raise ValueError("analyze takes one model: a run directory or --model, not both")
    loaded = sources[0]
    settings = settings_from_args(args)
    bundle = loaded.data(data_dir=args.data_dir)
    grid = settings.checked_grid(bundle)
    eps = parse_eps(args.at_eps) if args.at_eps else grid[len(grid) // 2]
    check_eps_fits(eps, settings.norm, bundle.bounds, bundle.train_x[0].numel())
    out = output_dir(args)
    cov, x, x_adv = perturbation_covariance(loaded.model, bundle, settings, eps=eps)
    k = min(args.examples, len(x))
    probs = softmax_along_line(loaded.model, x[:k], x_adv[:k])  # (T, k, K)
    if not is_writer():
        return 0
    radii = list(range(len(cov.perturbation)))
    norm = lambda v: [a / v[0] if v[0] else 0.0 for a in v]  # noqa: E731 - normalized to 1 at 0
    plot_curves(out / "covariance.png", {"PGD perturbations": (radii, norm(cov.perturbation)),
                                         "data (centred)": (radii, norm(cov.data))},
                title=f"covariance function, normalized ({loaded.name}, ε = {eps:.4g})",
                xlabel="displacement (pixels)", ylabel="K(r) / K(0)", percent=False)
    plt = _pyplot()
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3), dpi=120, squeeze=False)
    ts = [i / (probs.shape[0] - 1) for i in range(probs.shape[0])]
    for i in range(k):
        ax = axes[0][i]
        for c in range(probs.shape[2]):
            if float(probs[:, i, c].max()) > 0.05:
                ax.plot(ts, probs[:, i, c].tolist(), label=f"class {c}")
        ax.set_xlabel("t  (x + t·(x_adv − x))")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("softmax probability")
    fig.suptitle(f"softmax along clean → PGD lines ({loaded.name})")
    fig.tight_layout()
    fig.savefig(out / "smoothness.png")
    plt.close(fig)
    decay = lambda d: f"{d:.2f} px" if d is not None else "does not fall to 1/e"  # noqa: E731
    decay_table = markdown_table(["covariance function", "decay length (1/e)"],
                                 [["PGD perturbations", decay(cov.perturbation_decay)],
                                  ["data (centred)", decay(cov.data_decay)]])
    text = (f"# Perturbation analysis of {loaded.name}\n\nPGD-{settings.pgd_steps} ({settings.norm}, ε = {eps:.4g}) "
            f"on {len(x)} test points.\n\n{decay_table}\n\n"
            "![covariance](covariance.png)\n\n![smoothness](smoothness.png)\n")
    payload = {"run": loaded.name, **cov.__dict__}
    if args.norms:
        from ..analysis import input_gradient_norms, norm_stats, norms_markdown, plot_norm_distributions
        from ..threat import canonical_norm

        pen = loaded.train_config.get("penalty", {})
        p = canonical_norm(args.opnorm_p or pen.get("norm", "l2"))
        q = canonical_norm(args.opnorm_q or pen.get("out_norm", "l2"))
        values = input_gradient_norms(loaded.model, x, test_subset(bundle, settings.n_test)[1], opnorm_p=p,
                                      opnorm_q=q, batch_size=settings.batch_size, seed=settings.seed)
        plot_norm_distributions({loaded.name: values}, str(out / "norms.png"), title=f"per-example norms ({loaded.name})")
        text += (f"\n## Per-example norms ({len(x)} test points)\n\n{norms_markdown({loaded.name: values})}"
                 "\n![norms](norms.png)\n")
        payload["norms"] = [s.__dict__ for s in norm_stats(values)]
    (out / "report.md").write_text(text)
    write_json(out / "results.json", payload)
    add_record(out / "results.json", args, n=len(x), seeds=[settings.seed])
    print(text)
    return 0
