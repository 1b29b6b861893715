"""Cost of one training step of each method as a multiple of a clean step.

C&W MNIST CNN (1×28×28, 312,202 parameters), batch 128, Adam, CPU threads as torch sets them.
All methods are timed in one process, round-robin (one step of each method per round, so a
background load affects them alike); the ratio is the median step time of a method over the
median clean step time. Inputs are MNIST-10k images when the shared MNIST test set is there,
random images otherwise (timing does not depend on the values).

With ``--baseline OTHER/src`` the same methods of another gradreg source tree (say, a checkout of
the commit before a refactoring) are timed in the same process, interleaved step by step with
this tree's (the order alternating per round), and each method's cost change is the median over
rounds of the ratio of its two adjacent steps: a background load slows both sides of a pair
alike, so it cancels in the ratio.

Also checks the warm-started operator-norm penalty: while training with 1 power iteration per
step (each example's last output-space u kept), after every epoch over the pool its σ estimate is compared
with a fresh 10-iteration estimate on the same weights (and the fresh 10-iteration estimate
with a 50-iteration one, to show how converged the reference itself is).

    python benchmarks/penalties.py --rounds 15
    python benchmarks/penalties.py --rounds 30 --opnorm-epochs 0 --baseline /path/to/old/src
    python benchmarks/penalties.py --members --rounds 10 --threads 1

With ``--members`` the single-step, alignment, curvature, linearity and Jacobian members are
each timed against a plain PyTorch implementation of the same method (written out in this file,
no gradreg), the two steps adjacent in every round as for ``--baseline``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import platform
import statistics
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional as F

from baseline import load_baseline, ratio_summary
from gradreg import __version__, data, models, penalties
from gradreg.objective import Objective
from gradreg.penalties.opnorm import power_method

# (label, registry name, parameters, λ) — parameters as the targets in the issue state them
METHODS = [
    ("clean", "clean", {}, 0.0),
    ("gn", "gn", {}, 1.0),
    ("datagrad exact (ℓ1)", "datagrad", {"p": 1}, 0.05),
    # φ given explicitly (the default, 2λ): the same objective in gradreg versions whose default differs
    ("datagrad fd (ℓ1)", "datagrad", {"p": 1, "solver": "fd", "fd_step": 0.1}, 0.05),
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


def setup(pen: penalties.Penalty, model: torch.nn.Module, x: torch.Tensor) -> None:
    """``setup(model, train_x)``; the earlier interface took ``train_x`` alone (so the benchmark
    can time an earlier gradreg side by side)."""
    if "model" in inspect.signature(pen.setup).parameters:
        pen.setup(model, x)
    else:
        pen.setup(x)  # type: ignore[call-arg]  # the earlier one-argument setup


def build(pkg: Any, name: str, params: dict[str, Any], lam: float, x_all: torch.Tensor
          ) -> tuple[torch.nn.Module, Any, torch.optim.Optimizer]:
    """Model, objective and optimizer of one method from package ``pkg`` (this gradreg or the
    baseline); the same initial weights for every method and package."""
    torch.manual_seed(0)
    model = models.make("cw")
    pen = importlib.import_module(pkg.__name__ + ".penalties").make(name, **params)
    setup(pen, model, x_all)
    obj = importlib.import_module(pkg.__name__ + ".objective").Objective([(name, pen, lam)], task_weight=pen.task_weight)
    return model, obj, torch.optim.Adam(model.parameters(), lr=1e-3)


def step(model: torch.nn.Module, obj: Any, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
         idx: torch.Tensor) -> float:
    """Seconds of one training step, as the training loop takes it."""
    model.train()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out = obj(model, x, y, index=idx)
    out.loss.backward(inputs=list(model.parameters()))
    opt.step()
    return time.perf_counter() - t0


def interleaved_rounds(x_all: torch.Tensor, y_all: torch.Tensor, *, rounds: int, batch_size: int,
                       sides: tuple[str, str]) -> Iterator[tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, str]]]:
    """(timed, idx, x, y, order) per round: two warm-up rounds (not timed) then ``rounds``; the
    batches walk the pool; the two sides' order alternates per round, so a background load
    slows both steps of a pair alike."""
    steps_per_pool = len(x_all) // batch_size
    for r in range(rounds + 2):
        i = r % steps_per_pool
        idx = torch.arange(i * batch_size, (i + 1) * batch_size)
        order = sides if r % 2 == 0 else (sides[1], sides[0])
        yield r >= 2, idx, x_all[idx], y_all[idx], order


def compare(baseline_src: str, x_all: torch.Tensor, y_all: torch.Tensor, *, rounds: int, batch_size: int,
            source: str) -> None:
    """Every method of this tree against the same method of ``baseline_src``, interleaved."""
    base = load_baseline(baseline_src)
    pkgs = {"baseline": base, "current": sys.modules["gradreg"]}
    setups = {(label, side): build(pkg, name, params, lam, x_all)
              for label, name, params, lam in METHODS for side, pkg in pkgs.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in setups}
    for timed, idx, x, y, order in interleaved_rounds(x_all, y_all, rounds=rounds, batch_size=batch_size,
                                                      sides=("baseline", "current")):
        for label, *_ in METHODS:
            for side in order:
                t = step(*setups[(label, side)], x, y, idx)
                if timed:
                    times[(label, side)].append(t)
    print(f"# penalties, current vs baseline: gradreg {__version__} ({Path(sys.modules['gradreg'].__file__ or '').parent}) "
          f"vs {Path(base.__file__ or '').parent}; torch {torch.__version__}, Python {platform.python_version()}")
    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"inputs: {source}; batch {batch_size}; {rounds} timed rounds, each method's two versions in adjacent "
          "steps (order alternating per round)")
    print("\n| method | baseline step (ms) | current step (ms) | current / baseline: median of per-round ratios "
          "[IQR] |\n|---|---|---|---|")
    for label, *_ in METHODS:
        b, c = times[(label, "baseline")], times[(label, "current")]
        print(f"| {label} | {1000 * statistics.median(b):.1f} | {1000 * statistics.median(c):.1f} | "
              f"{ratio_summary(b, c)} |")


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
    ap.add_argument("--opnorm-epochs", type=int, default=6, help="epochs of the warm-start accuracy check")
    ap.add_argument("--opnorm-iterations", type=int, default=1, help="power iterations per step in that check")
    ap.add_argument("--only-warm-start", action="store_true", help="run the warm-start accuracy check alone")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--members", action="store_true", help="time the single-step, alignment, curvature, "
                    "linearity and Jacobian members against plain PyTorch implementations of the same methods")
    ap.add_argument("--baseline", metavar="SRC", help="also time this gradreg source tree (its src/ folder), "
                    "interleaved, and print current / baseline per method")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_all, y_all, source = inputs(args.pool)
    if args.members:
        members_vs_plain(x_all, y_all, rounds=args.rounds, batch_size=args.batch_size, source=source)
        return
    if args.baseline:
        compare(args.baseline, x_all, y_all, rounds=args.rounds, batch_size=args.batch_size, source=source)
        return
    if args.only_warm_start:
        warm_start_accuracy(x_all, y_all, batch_size=args.batch_size, epochs=args.opnorm_epochs,
                            iterations=args.opnorm_iterations)
        return
    steps_per_pool = args.pool // args.batch_size
    setups = []
    for label, name, params, lam in METHODS:
        torch.manual_seed(0)
        model = models.make("cw")
        pen = penalties.make(name, **params)
        setup(pen, model, x_all)
        obj = Objective([(name, pen, lam)], task_weight=pen.task_weight)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        setups.append((label, model, obj, opt))
    times: dict[str, list[float]] = {label: [] for label, *_ in setups}
    params = {label: list(model.parameters()) for label, model, *_ in setups}
    for r in range(args.rounds + 2):  # two warm-up rounds
        i = r % steps_per_pool
        idx = torch.arange(i * args.batch_size, (i + 1) * args.batch_size)
        x, y = x_all[idx], y_all[idx]
        for label, model, obj, opt in setups:
            model.train()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = obj(model, x, y, index=idx)
            out.loss.backward(inputs=params[label])  # as the training loop does
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
    floors(x_all[:args.batch_size], y_all[:args.batch_size], rounds=args.rounds, clean_ms=1000 * clean)
    warm_start_accuracy(x_all, y_all, batch_size=args.batch_size, epochs=args.opnorm_epochs,
                        iterations=args.opnorm_iterations)


def floors(x: torch.Tensor, y: torch.Tensor, *, rounds: int, clean_ms: float) -> None:
    """What the extra passes cost on this machine, measured, and the lower bounds they imply:
    an input-gradient pass (forward + ∇ₓ, no parameter gradients) is what every inner attack
    step and every one-step solver pays on top of the training step(s)."""
    torch.manual_seed(0)
    model = models.make("cw").eval()
    times: dict[str, list[float]] = {"forward": [], "input-gradient pass": []}
    for r in range(rounds + 2):
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x)
        t1 = time.perf_counter()
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(model(xi), y, reduction="sum"), xi)
        t2 = time.perf_counter()
        if r >= 2:
            times["forward"].append(t1 - t0)
            times["input-gradient pass"].append(t2 - t1)
    fwd = 1000 * statistics.median(times["forward"])
    ig = 1000 * statistics.median(times["input-gradient pass"])
    print(f"\nunit costs: forward {fwd:.1f} ms ({fwd / clean_ms:.2f}× clean step), input-gradient pass "
          f"{ig:.1f} ms ({ig / clean_ms:.2f}× clean step). Lower bounds they imply (no implementation "
          f"overhead):")
    print(f"- one step on x + r* alone (Lyu onestep, λ = 1): 1 + {ig / clean_ms:.2f} = {1 + ig / clean_ms:.2f}×")
    print(f"- TRADES, K = 10: 10 input-gradient passes + the clean and the adversarial step: "
          f"{2 + 10 * ig / clean_ms:.2f}×")
    print("- finite difference with a clean weight ≠ 0 (DataGrad fd): two full steps, 2.0×")


def relative_gap(pen: penalties.Penalty, model: torch.nn.Module, x: torch.Tensor,
                 reference: torch.Tensor, iterations: int) -> tuple[float, float]:
    """Median and 95th percentile of |σ_warm − σ_ref| / σ_ref. σ_warm is what the next training
    step would compute: one iteration from each example's kept u (the buffer is not written)."""
    warm = power_method(model, x, norm="l2", iterations=iterations, u0=pen.u_buf).sigma
    rel = (warm - reference).abs() / reference.clamp_min(1e-12)
    return 100 * float(rel.median()), 100 * float(rel.quantile(0.95))


def warm_start_accuracy(x_all: torch.Tensor, y_all: torch.Tensor, *, batch_size: int, epochs: int,
                        iterations: int = 1) -> None:
    """Train with the warm-started opnorm penalty (1 iteration per step, each example's last u
    kept) and, after every epoch over the pool, compare its σ estimate with a fresh
    10-iteration power method on the same weights; also show how far 10 iterations are from 50."""
    torch.manual_seed(0)
    model = models.make("cw")
    pen = penalties.make("opnorm", norm="l2", eps=1.0, warm_start=True, iterations=iterations)
    setup(pen, model, x_all)
    obj = Objective([("opnorm", pen, 1.0)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = len(x_all)
    print(f"\nopnorm warm start ({iterations} iteration(s) per step) vs a fresh power method, {n} examples, "
          f"relative difference of σ (median / 95th percentile):\n")
    print("| epochs over the pool | vs fresh 10 iterations | fresh 10 vs fresh 50 iterations |\n|---|---|---|")
    for epoch in range(1, epochs + 1):
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(i + batch_size, n))
            opt.zero_grad(set_to_none=True)
            obj(model, x_all[idx], y_all[idx], index=idx).loss.backward()
            opt.step()
        model.eval()
        torch.manual_seed(epoch)
        fresh10 = power_method(model, x_all, norm="l2", iterations=10).sigma
        torch.manual_seed(epoch)
        fresh50 = power_method(model, x_all, norm="l2", iterations=50).sigma
        med, p95 = relative_gap(pen, model, x_all, fresh10, iterations)
        gap = (fresh10 - fresh50).abs() / fresh50.clamp_min(1e-12)
        print(f"| {epoch} | {med:.2f}% / {p95:.2f}% | {100 * float(gap.median()):.2f}% / "
              f"{100 * float(gap.quantile(0.95)):.2f}% |")
        model.train()


# --- the single-step, alignment, curvature, linearity and Jacobian members against plain PyTorch ---
# (label, registry name, parameters, λ, target: gradreg step / plain step). ε = 0.1 on MNIST pixels.
MEMBERS = [
    ("fgsm-rs", "fgsm-rs", {"eps": 0.1}, 1.0, 1.0),
    ("n-fgsm", "n-fgsm", {"eps": 0.1}, 1.0, 1.0),
    ("gradalign", "gradalign", {"eps": 0.1, "align_lam": 0.2}, 1.0, 0.8),
    ("cure", "cure", {"h": 1.5}, 4.0, 0.8),
    ("llr (3 steps)", "llr", {"eps": 0.1, "steps": 3}, 1.0, 1.0),
    ("elle", "elle", {"eps": 0.1}, 5000.0, 1.0),
    ("elle-a", "elle-a", {"eps": 0.1}, 1.0, 1.0),
    ("jacreg (K = 1)", "jacreg", {"projections": 1}, 0.005, 0.8),
]


def _ce(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction=reduction)


def _grad_at(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses and ∇ₓΣℓ at x, the way a plain PyTorch loop writes it."""
    xi = x.detach().clone().requires_grad_(True)
    losses = _ce(model, xi, y, "none")
    (g,) = torch.autograd.grad(losses.sum(), xi, create_graph=create_graph)
    return losses, g


def plain_loss(name: str, params: dict[str, Any], lam: float, state: dict[str, float]) -> Any:
    """The same method written directly in PyTorch, without gradreg (one function per member):
    the loss whose backward pass the step takes. Everything in the model's train mode."""
    eps = params.get("eps", 0.1)

    def fgsm_rs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x0 = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        _, g = _grad_at(model, x0, y, create_graph=False)
        x_adv = (x + (x0 + 1.25 * eps * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
        return _ce(model, x_adv, y)

    def n_fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x0 = (x + torch.empty_like(x).uniform_(-2 * eps, 2 * eps)).clamp(0, 1)
        _, g = _grad_at(model, x0, y, create_graph=False)
        return _ce(model, (x0 + eps * g.sign()).clamp(0, 1), y)

    def gradalign(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, g1 = _grad_at(model, x, y, create_graph=True)
        _, g2 = _grad_at(model, (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1), y, create_graph=True)
        cos = F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1)
        x_adv = (x + eps * g1.detach().sign()).clamp(0, 1)
        return _ce(model, x_adv, y) + params["align_lam"] * (1 - cos.mean())

    def cure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses, g = _grad_at(model, x, y, create_graph=True)
        s = g.detach().sign()
        z = s / s.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        _, g_h = _grad_at(model, x + params["h"] * z, y, create_graph=True)
        return losses.mean() + lam * (g_h - g).flatten(1).pow(2).sum(dim=1).mean()

    def llr(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses, g = _grad_at(model, x, y, create_graph=True)
        l0, g0 = losses.detach(), g.detach()
        delta = torch.empty_like(x).uniform_(-eps, eps)
        for _ in range(params["steps"]):
            d = delta.clone().requires_grad_(True)
            gap = (_ce(model, x + d, y, "none") - l0 - (d * g0).flatten(1).sum(dim=1)).abs()
            (gd,) = torch.autograd.grad(gap.sum(), d)
            delta = (delta + 0.25 * eps * gd.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
        first = (delta * g).flatten(1).sum(dim=1)
        gamma = (_ce(model, x + delta, y, "none") - losses - first).abs()
        return losses.mean() + lam * (4.0 * gamma + 3.0 * first.abs()).mean()

    def elle_error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xa = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        xb = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        a = torch.rand(len(x), device=x.device)
        xc = a.view(-1, 1, 1, 1) * xa + (1 - a.view(-1, 1, 1, 1)) * xb
        la, lb, lc = _ce(model, torch.cat([xa, xb, xc]), y.repeat(3), "none").view(3, -1)
        return (lc - a * la - (1 - a) * lb).pow(2).mean()

    def elle(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _ce(model, x, y) + lam * elle_error(model, x, y)

    def elle_a(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        err = elle_error(model, x, y)
        e, n = float(err.detach()), state["n"]
        std = (state["m2"] / (n - 1)) ** 0.5 if n > 1 else 0.0
        state["lam"] = 5000.0 if n >= 2 and e > state["mean"] + 2 * std else state["lam"] * 0.99
        d = e - state["mean"]
        state["n"] = n + 1
        state["mean"] += d / (n + 1)
        state["m2"] += d * (e - state["mean"])
        return _ce(model, x, y) + state["lam"] * err

    def jacreg(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xi = x.clone().requires_grad_(True)
        logits = model(xi)
        v = torch.randn_like(logits)
        v = v / v.norm(dim=1, keepdim=True)
        (vj,) = torch.autograd.grad(logits, xi, grad_outputs=v, create_graph=True)
        frob = logits.shape[1] * vj.flatten(1).pow(2).sum(dim=1).mean()
        return F.cross_entropy(logits, y) + lam * frob

    fns = {"fgsm-rs": fgsm_rs, "n-fgsm": n_fgsm, "gradalign": gradalign, "cure": cure, "llr": llr, "elle": elle,
           "elle-a": elle_a, "jacreg": jacreg}
    return fns[name]


def members_vs_plain(x_all: torch.Tensor, y_all: torch.Tensor, *, rounds: int, batch_size: int, source: str) -> None:
    """Each member's gradreg step against the same method in plain PyTorch, in one process, the
    two steps adjacent (order alternating per round); the ratio is the median of per-round ratios."""
    setups: dict[tuple[str, str], tuple[torch.nn.Module, Any, torch.optim.Optimizer]] = {}
    for label, name, params, lam, _ in MEMBERS:
        setups[(label, "gradreg")] = build(sys.modules["gradreg"], name, params, lam, x_all)
        torch.manual_seed(0)
        model = models.make("cw")
        setups[(label, "plain")] = (model, plain_loss(name, params, lam, {"lam": 5000.0, "n": 0, "mean": 0.0, "m2": 0.0}),
                                    torch.optim.Adam(model.parameters(), lr=1e-3))
    times: dict[tuple[str, str], list[float]] = {key: [] for key in setups}
    for timed, idx, x, y, order in interleaved_rounds(x_all, y_all, rounds=rounds, batch_size=batch_size,
                                                      sides=("plain", "gradreg")):
        for label, *_ in MEMBERS:
            for side in order:
                model, obj, opt = setups[(label, side)]
                if side == "gradreg":
                    t = step(model, obj, opt, x, y, idx)
                else:
                    model.train()
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    obj(model, x, y).backward()
                    opt.step()
                    t = time.perf_counter() - t0
                if timed:
                    times[(label, side)].append(t)
    print(f"# members vs plain PyTorch: gradreg {__version__}, torch {torch.__version__}, Python "
          f"{platform.python_version()}")
    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"inputs: {source}; batch {batch_size}; {rounds} timed rounds, gradreg's and the plain step adjacent "
          "(order alternating per round)")
    print("\n| method | plain PyTorch step (ms) | gradreg step (ms) | gradreg / plain: median of per-round ratios "
          "[IQR] | target |\n|---|---|---|---|---|")
    for label, *_, target in MEMBERS:
        p, g = times[(label, "plain")], times[(label, "gradreg")]
        ratios = sorted(b / a for a, b in zip(p, g))
        ok = "✓" if statistics.median(ratios) <= target else "✗"
        print(f"| {label} | {1000 * statistics.median(p):.1f} | {1000 * statistics.median(g):.1f} | "
              f"{ratio_summary(p, g)} | ≤ {target}× {ok} |")


if __name__ == "__main__":
    main()
