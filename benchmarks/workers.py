"""One fixed piece of work, two ways to spend the cores on it: N one-thread worker processes
(``gradreg reproduce --jobs N``, :class:`gradreg.runner.Runner` with ``jobs = N``) against one
process whose torch uses N intra-op threads (``--jobs 1`` with N threads).

The work is a wave of independent trainings (``--methods``, each ``--epochs`` epochs of the
C&W CNN on ``--data``, batch 128), trained from scratch in fresh folders by each mode; the two
modes alternate over ``--rounds`` rounds (a background load slows both alike). Reported: each
mode's wall time per round and the median ratio.

    python benchmarks/workers.py --data mnist10k --methods clean gn fgsm-rs trades --epochs 1 --rounds 2
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gradreg import __version__
from gradreg.config import TrainConfig
from gradreg.runner import Runner


def wave(methods: list[str], args: argparse.Namespace, out: Path) -> list[tuple[str, TrainConfig]]:
    """The fixed work: one training per method, in its own folder under ``out``."""
    return [(m, TrainConfig(data=args.data, model="cw", method=m, epochs=args.epochs, batch_size=128, seed=0,
                            out=str(out / m), monitor=False).validate()) for m in methods]


def timed(jobs: int, threads: int, args: argparse.Namespace, root: Path) -> float:
    """Wall seconds for the wave with ``jobs`` workers (jobs = 1: in this process on ``threads``)."""
    out = Path(tempfile.mkdtemp(dir=root))
    torch.set_num_threads(threads)
    started = time.perf_counter()
    Runner(jobs=jobs, log=lambda s: None).run(wave(args.methods, args, out))
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist10k")
    ap.add_argument("--methods", nargs="+", default=["clean", "gn", "fgsm-rs", "trades"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cores", type=int, default=2, help="N: workers of one thread vs one process of N threads")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    workers, threaded = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = [("workers", args.cores, 1), ("threads", 1, args.cores)]
            for name, jobs, threads in order if r % 2 == 0 else order[::-1]:
                seconds = timed(jobs, threads, args, Path(tmp))
                (workers if name == "workers" else threaded).append(seconds)
                print(f"round {r + 1}: {name}: {seconds:.1f} s", flush=True)
    ratio = statistics.median(t / w for t, w in zip(threaded, workers))
    print(f"\n# workers vs threads: gradreg {__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.1f}")
    print(f"# work: {', '.join(args.methods)} on {args.data}, C&W CNN, {args.epochs} epoch(s), batch 128; {args.rounds} rounds, "
          "modes alternating")
    print(f"| mode | wall per round (s) |\n|---|---|")
    print(f"| {args.cores} one-thread workers | {', '.join(f'{t:.1f}' for t in workers)} |")
    print(f"| 1 process, {args.cores} threads | {', '.join(f'{t:.1f}' for t in threaded)} |")
    print(f"\nthreads / workers, median over rounds: {ratio:.2f}×")


if __name__ == "__main__":
    main()
