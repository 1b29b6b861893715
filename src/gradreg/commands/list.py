"""``gradreg list``: what the registries hold (data sets, models, methods, attacks)."""
from __future__ import annotations

import argparse
import re
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
            print(f"  {name:<16} {first_sentence(full_doc(reg, name, doc))}{extra}")
    return 0


def full_doc(reg: Registry[Any], name: str, first_line: str) -> str:
    """The factory's first docstring paragraph, joined into one line (the registry keeps only
    its first line); the registered text when it was given explicitly."""
    factory = reg.get(name)
    doc = (getattr(factory, "__doc__", None) or "").strip()
    if not doc or not doc.startswith(first_line):
        return first_line
    return " ".join(doc.split("\n\n")[0].split())


_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :func:`gradreg.x` → gradreg.x
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def first_sentence(text: str) -> str:
    """The whole first sentence, without reST markup (``code``, :role:`target`)."""
    plain = _ROLE.sub(r"\1", text).replace("``", "").replace("`", "")
    return _SENTENCE_END.split(plain, maxsplit=1)[0].strip()
