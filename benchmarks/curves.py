"""Robustness curves: the fast PGD sweep against the carry-over sweep and fresh per-ε PGD.

On MNIST-10k (``gradreg.data.load("mnist10k")``), the first ``--n`` test points, the C&W CNN
trained briefly as in ``benchmarks/attacks.py`` (clean; with ``--models clean pgd-at`` also a
briefly PGD-adversarially trained one), ℓ∞ PGD-``--steps`` with the default step size
2.5ε/steps, predicted labels, every curve scored by the judge (``gradreg.judge``, as
``gradreg attack --eps ...`` does), over the 8 radii of the SGR grid [0, 32]/255 without 0.

Timed, interleaved in one process (one run of each per round, median over ``--repeats`` rounds,
the first included: no separate warm-up, to keep the run short on a shared machine):

- one radius: a fresh PGD at the largest radius (``sweep="carry"`` with one ε: the attack as it
  was before the fast sweep existed);
- carry: the old multi-ε sweep (every input still robust attacked at every radius);
- fast: the new bisection sweep (``sweep="fast"``, :mod:`gradreg.attacks.curves`).

Accuracy: the fresh per-ε curve (every radius its own run, attack seeds ``--seeds``) against
the fast sweep with the same seed; the largest gap is in points (fast − fresh: positive means
the fast curve claims more robustness). With two seeds, fresh against fresh is the noise of PGD
itself.
Also counts the model's forward rows with and without gradient (one PGD step on one input is
one gradient row), a cost measure that the machine's load does not move.

    python benchmarks/curves.py --threads 1 --update BENCHMARKS.md
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
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks import cpu_name, train_model, update_section  # noqa: E402  (benchmarks/attacks.py)

from gradreg import ThreatModel, __version__, data, judge  # noqa: E402
from gradreg.attacks import make  # noqa: E402
from gradreg.attacks.pgd_core import ce_loss, pgd  # noqa: E402

SECTION = "## Robustness curves (benchmarks/curves.py)"


def adversarial_finetune(model: nn.Module, bundle: data.DataBundle, *, steps: int, eps: float, seed: int,
                         device: torch.device) -> nn.Module:
    """``steps`` Adam steps (batch 64, lr 1e-3) on ℓ∞ PGD-5 examples at ``eps`` (Madry's PGD-AT)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    threat = ThreatModel("linf", eps, bundle.bounds)
    for _ in range(steps):
        idx = torch.randint(0, len(bundle.train_y), (64,), generator=gen)
        xb, yb = bundle.train_x[idx].to(device), bundle.train_y[idx].to(device)
        model.eval()
        x_adv = pgd(model, xb, threat, ce_loss(yb), steps=5, rel_stepsize=2.5 / 5, random_start=True, generator=gen)
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x_adv), yb).backward()
        opt.step()
    return model.eval()


class RowCounter:
    """Counts the rows the model sees, with and without gradient (a forward hook)."""

    def __init__(self, model: nn.Module) -> None:
        self.grad = self.plain = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if torch.is_grad_enabled():
            self.grad += len(args[0])
        else:
            self.plain += len(args[0])

    def reset(self) -> tuple[int, int]:
        out = (self.grad, self.plain)
        self.grad = self.plain = 0
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="test points")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--models", nargs="+", choices=("clean", "pgd-at"), default=["clean"])
    parser.add_argument("--at-steps", type=int, default=300, help="PGD-AT fine-tuning steps (pgd-at model)")
    parser.add_argument("--at-eps", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="attack seeds compared (0 first)")
    parser.add_argument("--update", metavar="BENCHMARKS.md", default=None, help="replace our section in this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = data.load("mnist10k")
    x, y = bundle.test_x[:args.n], bundle.test_y[:args.n]
    grid = [32 / 255 * i / 8 for i in range(1, 9)]
    threat = ThreatModel("linf", 0.0, bundle.bounds)
    n = len(y)

    def attack(sweep: str, seed: int = 0):  # type: ignore[no-untyped-def]
        return make("pgd", steps=args.steps, labels="predicted", seed=seed, sweep=sweep)

    lines = [SECTION, ""]
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines += [
        f"ℓ∞ PGD-{args.steps} (step 2.5ε/{args.steps}, random start, predicted labels) over the 8 radii "
        "ε = 4/255, 8/255, …, 32/255, on the first "
        f"{n} MNIST-10k test images, C&W CNN trained {args.train_steps} Adam steps on MNIST-10k (clean)"
        + (f" and the same model fine-tuned {args.at_steps} steps with PGD-5 adversarial training at "
           f"ε = {args.at_eps:g} (pgd-at)" if "pgd-at" in args.models else "")
        + ". Every curve is scored by the judge, batch 256, as `gradreg attack --eps ...`. Time: median of "
        f"{args.repeats} interleaved rounds (one run of each per round, the first one included); "
        "\"× one radius\" divides by a fresh PGD run at ε = 32/255 (`sweep=\"carry\"` with one ε, the attack "
        "as it was). Gradient rows: forward rows with gradient (one PGD step on one input) per test point.",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, device {device}",
        f"- versions: gradreg {__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        f"- command: `{command}`",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]
    for kind in args.models:
        model = train_model(bundle, steps=args.train_steps, seed=args.seed, device=device)
        if kind == "pgd-at":
            model = adversarial_finetune(model, bundle, steps=args.at_steps, eps=args.at_eps, seed=args.seed,
                                         device=device)
        counter = RowCounter(model)

        def score(sweep: str, eps: list[float], seed: int = 0) -> list[float]:
            return judge.robust_accuracy(model, x.to(device), y.to(device), attack(sweep, seed), threat, eps,
                                         batch_size=256, progress=False)

        cases: dict[str, Callable[[], list[float]]] = {
            "one radius": lambda: score("carry", [grid[-1]]),
            "carry": lambda: score("carry", grid),
            "fast": lambda: score("fast", grid),
        }
        rows: dict[str, tuple[int, int]] = {}
        times: dict[str, list[float]] = {name: [] for name in cases}
        fast: dict[int, list[float]] = {}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                counter.reset()
                t0 = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t0)
                rows[name] = counter.reset()
                if name == "fast":
                    fast[0] = out
            print(f"{kind}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), file=sys.stderr)
        med = {k: statistics.median(v) for k, v in times.items()}
        fresh = {s: [score("carry", [e], seed=s)[0] for e in grid] for s in args.seeds}
        fast.update({s: score("fast", grid, seed=s) for s in args.seeds if s != 0})
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        with torch.no_grad():
            clean = float((model(x.to(device)).argmax(1).cpu() == y).float().mean())
        lines += ["", f"### {kind} (clean accuracy {100 * clean:.1f} %, load average at the end {load:.1f})", "",
                  "| sweep | median time (s) | × one radius | gradient rows / point | × one radius | "
                  "forward rows / point |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in cases:
            g, p = rows[name]
            lines.append(f"| {name} | {med[name]:.1f} | {med[name] / med['one radius']:.2f}× | {g / n:.1f} | "
                         f"{g / max(rows['one radius'][0], 1):.2f}× | {p / n:.1f} |")
        head = "".join(f" fresh s{q} (%) | fast s{q} (%) | fast − fresh s{q} |" for q in args.seeds)
        lines += ["", "| ε |" + head, "|---|" + "---:|---:|---:|" * len(args.seeds)]
        for k, e in enumerate(grid):
            cells = "".join(f" {100 * fresh[q][k]:.1f} | {100 * fast[q][k]:.1f} | {100 * (fast[q][k] - fresh[q][k]):+.1f} |"
                            for q in args.seeds)
            lines.append(f"| {round(e * 255)}/255 |" + cells)
        gaps = [100 * (fast[q][k] - fresh[q][k]) for q in args.seeds for k in range(len(grid))]
        lines += ["", f"Largest gap fast − fresh: {max(gaps):+.1f} points (most negative {min(gaps):+.1f}; "
                      f"one image is {100 / n:.1f})."]
        if len(args.seeds) > 1:
            noise = [100 * abs(fresh[args.seeds[1]][k] - fresh[args.seeds[0]][k]) for k in range(len(grid))]
            lines[-1] += f" PGD's own noise, largest |fresh s{args.seeds[1]} − fresh s{args.seeds[0]}|: {max(noise):.1f} points."
        print("\n".join(lines[-len(grid) - 12:]), file=sys.stderr)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.update:
        update_section(Path(args.update), table, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
