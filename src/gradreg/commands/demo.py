"""``gradreg demo``: the main job on the embedded digits data set."""
from __future__ import annotations

import argparse

from ..config import TrainConfig
from ..train import train

HELP = "train on the embedded digits data set and show what gradreg does"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="folder for the runs and the report")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig(data="digits", model="cw", epochs=args.epochs, batch_size=64, out=f"{args.out}/clean",
                      quiet=args.quiet)
    metrics = train(cfg, resume=True)
    print(f"clean: test accuracy {metrics['test_accuracy']:.4f} in {metrics['train_seconds']:.1f} s -> {cfg.out}")
    return 0
