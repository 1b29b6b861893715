"""Attack throughput: gradreg vs IBM ART on the same model and inputs, in one run.

Images per second for FGSM, PGD-40 (ℓ∞) and DeepFool (ℓ2) on the Carlini–Wagner MNIST CNN
(``gradreg.models.make("cw")``, 1×28×28), batch 256. The model is trained briefly on MNIST-10k
(``gradreg.data.load("mnist10k")``, the real MNIST test set split 8,000/2,000) so DeepFool has
real decision boundaries to cross; with ``--random-data`` (or when MNIST-10k is not available)
it is trained on random images instead, and the table says so.

Every timing is the median of ``--repeats`` runs after one warm-up run. The attacked inputs are
the first 256 test images; both libraries get the same model object, the same inputs, labels
and hyper-parameters (ART's ``eps_step`` is our ``rel_stepsize``·ε). The table also reports the
accuracy under each attack (and DeepFool's ρ), so a fast but weaker attack would show.

    python benchmarks/attacks.py                          # print the markdown table
    python benchmarks/attacks.py --update BENCHMARKS.md   # also replace our section there
    python benchmarks/attacks.py --baseline OLD/src       # this tree against another gradreg, no ART

With ``--baseline`` the three attacks of this tree and of another gradreg source tree run on the
same model and inputs, interleaved (order alternating per repeat), and the table gives each
attack's current / baseline time as the median of per-pair ratios (see ``benchmarks/baseline.py``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from baseline import load_baseline, ratio_summary
from gradreg import ThreatModel, data, models
from gradreg.attacks import make

SECTION = "## Attacks (benchmarks/attacks.py)"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train_model(bundle: data.DataBundle, *, steps: int, seed: int, device: torch.device) -> torch.nn.Module:
    """A few hundred Adam steps of clean training (batch 64, lr 1e-3)."""
    torch.manual_seed(seed)
    model = models.make("cw", in_shape=bundle.in_shape, num_classes=10, mean=bundle.mean, std=bundle.std).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(bundle.train_y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(bundle.train_x[idx].to(device)), bundle.train_y[idx].to(device)).backward()
        opt.step()
    return model.eval()


def random_bundle(seed: int) -> data.DataBundle:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((2256, 1, 28, 28), generator=gen)
    y = torch.randint(0, 10, (2256,), generator=gen)
    return data.DataBundle("random", x[:2000], y[:2000], x[2000:], y[2000:], num_classes=10, bounds=(0.0, 1.0))  # torch.rand


def timed(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Median seconds over ``repeats`` runs after one warm-up run, and the last output."""
    out = fn()  # warm-up (allocator, lazy init)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def trained_batch(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    """The briefly trained C&W model and the first ``--batch`` test images, with a description."""
    device = torch.device(args.device)
    if args.random_data:
        bundle, source = random_bundle(args.seed), "random images (--random-data)"
    else:
        try:
            bundle, source = data.load("mnist10k"), "MNIST-10k (8,000 train images)"
        except Exception as err:  # noqa: BLE001  (any reason the data is missing: fall back, and say so)
            print(f"mnist10k not available ({err}); training on random images", file=sys.stderr)
            bundle, source = random_bundle(args.seed), "random images (MNIST-10k not available)"
    model = train_model(bundle, steps=args.train_steps, seed=args.seed, device=device)
    return model, bundle.test_x[:args.batch].to(device), bundle.test_y[:args.batch].to(device), source


def compare(args: argparse.Namespace) -> int:
    """FGSM, PGD-40 and DeepFool of this tree against ``args.baseline``'s, interleaved."""
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_baseline(args.baseline)
    base_make = importlib.import_module("gradreg_baseline.attacks").make
    base_threat = importlib.import_module("gradreg_baseline.threat").ThreatModel
    model, x, y, source = trained_batch(args)
    steps, rel = 40, 2.5 / 40
    cases = {
        "FGSM (ℓ∞, ε=0.3)": lambda mk, tm: mk("fgsm")(model, x, y, tm("linf", 0.3, (0.0, 1.0))),
        "PGD-40 (ℓ∞, ε=0.3)": lambda mk, tm: mk("pgd", steps=steps, rel_stepsize=rel)(
            model, x, y, tm("linf", 0.3, (0.0, 1.0))),
        "DeepFool (ℓ2, 50 it.)": lambda mk, tm: mk("deepfool", labels="predicted").minimal(
            model, x, y, tm("l2", 0.0, (0.0, 1.0))),
    }
    sides = {"baseline": (base_make, base_threat), "current": (make, ThreatModel)}
    rows = []
    for name, run in cases.items():
        times: dict[str, list[float]] = {"baseline": [], "current": []}
        outs: dict[str, torch.Tensor] = {}
        for r in range(args.repeats + 1):  # the first pair is a warm-up
            for side in (("baseline", "current") if r % 2 == 0 else ("current", "baseline")):
                t0 = time.perf_counter()
                outs[side] = run(*sides[side])
                if r:
                    times[side].append(time.perf_counter() - t0)
        same = bool(torch.equal(outs["baseline"], outs["current"]))
        rows.append(f"| {name} | {len(y) / statistics.median(times['baseline']):.1f} | "
                    f"{len(y) / statistics.median(times['current']):.1f} | "
                    f"{ratio_summary(times['baseline'], times['current'])} | {'yes' if same else 'no'} |")
    print(f"# attacks, current vs baseline ({Path(base.__file__ or '').parent}); torch {torch.__version__}, "
          f"Python {platform.python_version()}, {torch.get_num_threads()} torch threads; batch {len(y)} of {source}; "
          f"{args.repeats} timed pairs after one warm-up pair\n")
    print("| attack | baseline (img/s) | current (img/s) | current / baseline time: median of per-pair ratios "
          "[IQR] | same output |\n|---|---:|---:|---|---|")
    print("\n".join(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per attack (median reported)")
    parser.add_argument("--deepfool-repeats", type=int, default=3, help="timed runs for DeepFool (ART is slow)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--random-data", action="store_true", help="train on random images instead of MNIST-10k")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--update", metavar="BENCHMARKS.md", default=None, help="replace our section in this file")
    parser.add_argument("--baseline", metavar="SRC", help="time this gradreg source tree's attacks against ours "
                        "(interleaved, no ART)")
    args = parser.parse_args(argv)
    if args.baseline:
        return compare(args)

    import art
    from art.attacks.evasion import DeepFool, FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model, x, y, source = trained_batch(args)
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        clean_acc = float((model(x).argmax(1) == y).float().mean())
    print(f"trained {args.train_steps} steps on {source} in {train_s:.0f} s; clean accuracy on the "
          f"{len(y)} benchmark images {clean_acc:.3f}", file=sys.stderr)

    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                            clip_values=(0.0, 1.0), device_type="gpu" if device.type == "cuda" else "cpu")
    x_np, y_np = x.cpu().numpy(), y.cpu().numpy()
    eps_inf, steps = 0.3, 40
    rel = 2.5 / steps  # our default rel_stepsize for PGD-40
    linf = ThreatModel("linf", eps_inf, (0.0, 1.0))
    l2 = ThreatModel("l2", 0.0, (0.0, 1.0))

    def acc(x_adv: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(x_adv.to(device)).argmax(1) == y).float().mean())

    def rho(x_adv: torch.Tensor) -> float:
        x_adv = x_adv.to(device)
        return float(((x_adv - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).mean())

    df = make("deepfool", labels="predicted")  # ART's DeepFool attacks the predictions
    cases: list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor], int]] = [
        ("FGSM (ℓ∞, ε=0.3)",
         lambda: make("fgsm")(model, x, y, linf),
         lambda: torch.from_numpy(FastGradientMethod(clf, norm=np.inf, eps=eps_inf, batch_size=args.batch)
                                  .generate(x_np, y=y_np)),
         args.repeats),
        (f"PGD-{steps} (ℓ∞, ε=0.3, step 2.5ε/{steps}, random start)",
         lambda: make("pgd", steps=steps, rel_stepsize=rel)(model, x, y, linf),
         lambda: torch.from_numpy(ProjectedGradientDescent(
             clf, norm=np.inf, eps=eps_inf, eps_step=rel * eps_inf, max_iter=steps, num_random_init=1,
             batch_size=args.batch, verbose=False).generate(x_np, y=y_np)),
         args.repeats),
        ("DeepFool (ℓ2, overshoot 0.02, 50 it., 10 classes)",
         lambda: df.minimal(model, x, y, l2),
         lambda: torch.from_numpy(DeepFool(clf, max_iter=50, epsilon=0.02, nb_grads=10, batch_size=args.batch,
                                           verbose=False).generate(x_np)),
         args.deepfool_repeats),
    ]
    rows = []
    for name, ours, theirs, repeats in cases:
        t_ours, out_ours = timed(ours, repeats, device)
        t_art, out_art = timed(theirs, repeats, device)
        extra = (f"ρ {rho(out_ours):.3f} / {rho(out_art):.3f}" if name.startswith("DeepFool")
                 else f"acc {acc(out_ours):.3f} / {acc(out_art):.3f}")
        rows.append((name, len(y) / t_ours, len(y) / t_art, t_art / t_ours, extra))
        print(f"{name}: gradreg {len(y) / t_ours:.0f} img/s, ART {len(y) / t_art:.0f} img/s", file=sys.stderr)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = [
        SECTION,
        "",
        f"Images per second (median of {args.repeats} runs, DeepFool {args.deepfool_repeats}; one warm-up run "
        f"each), batch {len(y)}, C&W MNIST CNN (1×28×28) trained {args.train_steps} Adam steps on {source} "
        f"(clean accuracy {clean_acc:.3f} on the benchmark batch). Same model object, inputs and labels for both "
        "libraries; the last column checks that both attacks are equally strong (accuracy under attack, or "
        "DeepFool's ρ = mean ‖r‖₂/‖x‖₂; gradreg / ART).",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"device {device}, load average at the end {load:.1f}"
        + (" (with --threads 1: on a machine shared with other jobs, torch's intra-op threads spin on each other — "
           "we saw 10× slowdowns with 2 threads under load; both libraries run on the same torch)"
           if args.threads == 1 else ""),
        f"- versions: torch {torch.__version__}, ART {art.__version__}, Python {platform.python_version()}",
        f"- command: `{command}`",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        "| attack | gradreg (img/s) | ART (img/s) | speed-up | strength (gradreg / ART) |",
        "|---|---:|---:|---:|---|",
    ]
    def rate(v: float) -> str:
        return f"{v:.0f}" if v >= 10 else f"{v:.2f}"

    lines += [f"| {n} | {rate(a)} | {rate(b)} | {s:.1f}× | {e} |" for n, a, b, s, e in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.update:
        update_section(Path(args.update), table)
    return 0


def update_section(path: Path, section: str, heading: str = SECTION) -> None:
    """Replace the section ``heading`` (from it to the next ``## `` heading) or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


if __name__ == "__main__":
    sys.exit(main())
