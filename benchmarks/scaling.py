"""Training throughput for 1, 2, … data-parallel ranks (torchrun; gloo on CPU, nccl on GPU).

Each configuration trains for ``--epochs`` through the real CLI (``gradreg train --nproc N``)
and reads ``train_seconds`` (time inside training steps, rank 0) from ``metrics.json``;
throughput = training images processed / train_seconds. Repeated ``--repeats`` times; the
table shows the median. On a GPU machine pass e.g. ``--nproc 1 2 4 8 --data cifar10
--data-dir DATA --model resnet18``.

    python benchmarks/scaling.py --nproc 1 2 --methods clean gn --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gradreg import __version__, data


def run_once(nproc: int, method: str, args: argparse.Namespace, out: Path) -> float:
    cmd = [sys.executable, "-m", "gradreg", "train", "--data", args.data, "--model", args.model, "--method", method,
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--quiet", "--out", str(out),
           "--nproc", str(nproc)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // nproc))}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics["train_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=["clean", "gn"])
    ap.add_argument("--data", default="mnist10k")
    ap.add_argument("--data-dir")
    ap.add_argument("--model", default="cw")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    args = ap.parse_args()
    n_train = len(data.load(args.data, data_dir=args.data_dir).train_y)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    print(f"# scaling benchmark: gradreg {__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"# machine: {device}; data {args.data} ({n_train} train images), model {args.model}, global batch "
          f"{args.batch_size}, {args.epochs} epoch(s), {args.repeats} repeats (median); {args.threads} CPU threads split over ranks")
    print(f"# command: python benchmarks/scaling.py {' '.join(sys.argv[1:])}")
    print("\n| method | ranks | images/s | speed-up vs 1 rank |\n|---|---|---|---|")
    for method in args.methods:
        base = None
        for nproc in args.nproc:
            speeds = []
            for r in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    secs = run_once(nproc, method, args, Path(tmp) / "run")
                speeds.append(n_train * args.epochs / secs)
            med = statistics.median(speeds)
            base = base or med
            print(f"| {method} | {nproc} | {med:.0f} | {med / base:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
