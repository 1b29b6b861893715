"""AutoAttack's cost, attack by attack: where the time of a standard AutoAttack run goes.

On MNIST-10k (``gradreg.data.load("mnist10k")``), the first ``--n`` test points, the C&W CNN
trained briefly as in ``benchmarks/attacks.py`` (clean; with ``--models clean pgd-at`` also
the same model fine-tuned with PGD adversarial training, as in ``benchmarks/curves.py``),
ℓ∞ at ``--eps``. Each of standard AutoAttack's four attacks (APGD-CE, APGD-T, FAB-T, Square)
runs *alone* on every point (``gradreg.attacks.make("autoattack", version="custom",
attacks=[name])``, the package's settings for the standard version otherwise), then the
standard version as a whole, which runs them in turn on the points still robust.

Timed interleaved in one process: one run of each per round, median over ``--repeats`` rounds
(the first included, no separate warm-up: the package builds its attack objects on the first
call of every run anyway). Seconds per point are the median time over the points attacked. The
accuracy column shows that every configuration is judged on the same points.

    python benchmarks/autoattack_cost.py --threads 1 --update BENCHMARKS.md

(Not named autoattack.py: this folder is on sys.path, and that name would hide the package.)
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks import cpu_name, train_model, update_section  # noqa: E402  (benchmarks/attacks.py)
from curves import adversarial_finetune  # noqa: E402  (benchmarks/curves.py)

from gradreg import ThreatModel, __version__, data, judge  # noqa: E402
from gradreg.attacks import make  # noqa: E402
from gradreg.attacks.autoattack import backend, backend_version  # noqa: E402

SECTION = "## AutoAttack, attack by attack (benchmarks/autoattack_cost.py)"
ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="test points")
    parser.add_argument("--eps", type=float, default=0.1, help="ℓ∞ radius")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--models", nargs="+", choices=("clean", "pgd-at"), default=["clean", "pgd-at"])
    parser.add_argument("--at-steps", type=int, default=300, help="PGD-AT fine-tuning steps (pgd-at model)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="training and attack seed")
    parser.add_argument("--update", metavar="BENCHMARKS.md", default=None, help="replace our section in this file")
    args = parser.parse_args(argv)
    if backend() is None:
        print("AutoAttack is not installed: pip install 'gradreg[autoattack]'", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = data.load("mnist10k")
    x, y = bundle.test_x[:args.n].to(device), bundle.test_y[:args.n].to(device)
    threat = ThreatModel("linf", args.eps, bundle.bounds)
    package = backend()
    assert package is not None
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = [SECTION, "",
             f"ℓ∞ ε = {args.eps:g} on the first {len(y)} MNIST-10k test images; C&W CNN trained "
             f"{args.train_steps} Adam steps on MNIST-10k (clean)"
             + (f" and the same model fine-tuned {args.at_steps} steps with PGD-5 adversarial training at ε = "
                f"{args.eps:g} (pgd-at)" if "pgd-at" in args.models else "")
             + f". {package} {backend_version(package)}, every attack at the standard version's settings "
             "(100 iterations, 9 target classes for APGD-T and FAB-T, 5,000 queries for Square), seed "
             f"{args.seed}. Each attack alone attacks every point; the standard version runs them in turn on "
             f"the points still robust. Time: median of {args.repeats} interleaved rounds.", "",
             f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, device {device}",
             f"- versions: gradreg {__version__}, torch {torch.__version__}, Python {platform.python_version()}",
             f"- command: `{command}`",
             f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"]
    for kind in args.models:
        model = train_model(bundle, steps=args.train_steps, seed=args.seed, device=device)
        if kind == "pgd-at":
            model = adversarial_finetune(model, bundle, steps=args.at_steps, eps=args.eps, seed=args.seed,
                                         device=device)
        configs: dict[str, Callable[[], object]] = {
            name: (lambda name=name: make("autoattack", version="custom", attacks=[name], seed=args.seed))
            for name in ATTACKS}
        configs["standard (all four in turn)"] = lambda: make("autoattack", version="standard", seed=args.seed)
        times: dict[str, list[float]] = {name: [] for name in configs}
        accuracy: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, build in configs.items():
                t0 = time.perf_counter()
                accuracy[name] = judge.robust_accuracy(model, x, y, build(), threat, [args.eps],  # type: ignore[arg-type]
                                                       batch_size=len(y), progress=False)[0]
                times[name].append(time.perf_counter() - t0)
            print(f"{kind}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), file=sys.stderr)
        with torch.no_grad():
            clean = float((model(x).argmax(1) == y).float().mean())
        med = {k: statistics.median(v) for k, v in times.items()}
        total = med["standard (all four in turn)"]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        lines += ["", f"### {kind} (clean accuracy {100 * clean:.1f} %, load average at the end {load:.1f})", "",
                  "| attack | median time (s) | spread (min–max, s) | ms / point | robust accuracy (%) |",
                  "|---|---:|---:|---:|---:|"]
        for name in configs:
            lines.append(f"| {name} | {med[name]:.1f} | {min(times[name]):.1f}–{max(times[name]):.1f} | "
                         f"{1000 * med[name] / len(y):.0f} | {100 * accuracy[name]:.1f} |")
        share = {a: med[a] / sum(med[b] for b in ATTACKS) for a in ATTACKS}
        lines += ["", "Share of the four attacks' time when each attacks every point: "
                  + ", ".join(f"{a} {100 * share[a]:.0f} %" for a in ATTACKS)
                  + f". The standard run took {total:.1f} s ({1000 * total / len(y):.0f} ms per point)."]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.update:
        update_section(Path(args.update), table, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
