"""``gradreg list``: what the registries hold (data sets, models, methods, attacks)."""
from __future__ import annotations

import argparse
from typing import Any

from ..registry import Registry

HELP = "list the registered data sets, models, methods and attacks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", choices=("data", "models", "methods", "attacks"), help="one registry only")


def run(args: argparse.Namespace) -> int:
    from .. import attacks, data, models, penalties

    registries: dict[str, Registry[Any]] = {"data": data.DATASETS, "models": models.MODELS, "methods": penalties.PENALTIES,
                  "attacks": attacks.ATTACKS}
    for key, reg in registries.items():
        if args.what and args.what != key:
            continue
        print(f"{key}:")
        for name, doc in reg.describe().items():
            origin = reg.origins.get(name)
            extra = f"  [plugin: {origin}]" if origin else ""
            if key == "data" and data.train_defaults(name):
                d = data.train_defaults(name)
                schedule = f", {d['schedule']} schedule" if "schedule" in d else ""
                extra += f"  (train defaults: {d['epochs']} epochs, batch {d['batch_size']}, lr {d['lr']:g}{schedule})"
            print(f"  {name:<16} {doc}{extra}")
    return 0
