"""Cost of one training step of each method as a multiple of a clean step.

C&W MNIST CNN (1×28×28, 312,202 parameters), batch 128, Adam, CPU threads as torch sets them.
All methods are timed in one process, round-robin (one step of each method per round, so a
background load affects them alike); the ratio is the median step time of a method over the
median clean step time. Inputs are MNIST-10k images when the shared MNIST test set is there,
random images otherwise (timing does not depend on the values).

Also checks the warm-started operator-norm penalty: after training with 1 power iteration per
step (each example's last v kept), its σ estimate is compared with a fresh 10-iteration
estimate on the same examples.

    python benchmarks/penalties.py --rounds 15
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from gradreg import __version__, data, models, penalties
from gradreg.objective import Objective
from gradreg.penalties.opnorm import power_method

# (label, registry name, parameters, λ) — parameters as the targets in the issue state them
METHODS = [
    ("clean", "clean", {}, 0.0),
    ("gn", "gn", {}, 1.0),
    ("datagrad exact (ℓ1)", "datagrad", {"p": 1}, 0.05),
    ("datagrad fd (ℓ1)", "datagrad", {"p": 1, "solver": "fd"}, 0.05),
    ("lyu exact (ℓ∞)", "lyu", {"norm": "linf"}, 1.0),
    ("lyu onestep (ℓ∞)", "lyu", {"norm": "linf", "solver": "onestep"}, 1.0),
    ("sgr covfun (fgsm, every 10 steps)", "sgr", {"representation": "covfun", "source": "fgsm", "eps": 0.1}, 1.0),
    ("arr (fgsm, kl)", "arr", {"attack": "fgsm", "eps": 0.1}, 1.0),
    ("trades (K = 10)", "trades", {"eps": 0.1, "steps": 10}, 6.0),
    ("opnorm warm start (1 iteration)", "opnorm", {"norm": "l2", "eps": 1.0, "warm_start": True}, 1.0),
]
TARGETS = {"gn": 2.0, "datagrad exact (ℓ1)": 2.0, "lyu exact (ℓ∞)": 2.0, "datagrad fd (ℓ1)": 1.8,
           "lyu onestep (ℓ∞)": 1.8, "arr (fgsm, kl)": 2.7, "trades (K = 10)": 7.5,
           "opnorm warm start (1 iteration)": 3.0}


def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        bundle = data.load("mnist10k")
        return bundle.train_x[:n], bundle.train_y[:n], "MNIST-10k"
    except (OSError, ValueError):
        g = torch.Generator().manual_seed(0)
        return torch.rand((n, 1, 28, 28), generator=g), torch.randint(0, 10, (n,), generator=g), "random"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--pool", type=int, default=1024, help="training examples cycled through")
    args = ap.parse_args()
    torch.manual_seed(0)
    x_all, y_all, source = inputs(args.pool)
    steps_per_pool = args.pool // args.batch_size
    setups = []
    for label, name, params, lam in METHODS:
        torch.manual_seed(0)
        model = models.make("cw")
        pen = penalties.make(name, **params)
        pen.setup(x_all)
        obj = Objective([(name, pen, lam)], task_weight=pen.task_weight)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        setups.append((label, model, obj, opt))
    times: dict[str, list[float]] = {label: [] for label, *_ in setups}
    for r in range(args.rounds + 2):  # two warm-up rounds
        i = r % steps_per_pool
        idx = torch.arange(i * args.batch_size, (i + 1) * args.batch_size)
        x, y = x_all[idx], y_all[idx]
        for label, model, obj, opt in setups:
            model.train()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = obj(model, x, y, index=idx)
            out.loss.backward()
            opt.step()
            if r >= 2:
                times[label].append(time.perf_counter() - t0)
    clean = statistics.median(times["clean"])
    gn = statistics.median(times["gn"])
    print(f"# penalties benchmark: gradreg {__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"inputs: {source}; batch {args.batch_size}; {args.rounds} timed rounds (median)")
    print("\n| method | median step (ms) | × clean | target |\n|---|---|---|---|")
    for label in times:
        med = statistics.median(times[label])
        target = TARGETS.get(label)
        extra = ""
        if label.startswith("sgr"):
            extra = f" ({med / gn:.2f}× gn; target ≤ 1.1× gn)"
        ok = "" if target is None else (f"≤ {target}× {'✓' if med / clean <= target else '✗'}")
        print(f"| {label} | {1000 * med:.1f} | {med / clean:.2f}×{extra} | {ok} |")
    # warm start keeps the operator-norm estimate close to a fresh 10-iteration one
    label, model, obj, _ = setups[-1]
    pen = obj.penalties["opnorm"]
    for i in range(steps_per_pool):  # one more pass so every example has been visited
        idx = torch.arange(i * args.batch_size, (i + 1) * args.batch_size)
        obj(model, x_all[idx], y_all[idx], index=idx)
    idx = torch.arange(0, args.pool)
    warm = pen.estimate(model, x_all[idx], idx).sigma
    fresh = power_method(model, x_all[idx], norm="l2", iterations=10).sigma
    rel = ((warm - fresh).abs() / fresh.clamp_min(1e-12))
    print(f"\nopnorm warm start: 1-iteration σ vs fresh 10-iteration σ on {args.pool} examples: "
          f"median relative difference {100 * rel.median():.2f}%, 95th percentile {100 * rel.quantile(0.95):.2f}% "
          f"(target within 5%)")


if __name__ == "__main__":
    main()
