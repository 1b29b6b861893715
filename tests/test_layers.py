"""The layer rule of docs/ARCHITECTURE.md, checked: every module of ``src/gradreg`` imports only
modules of its own layer or of the layers below it.

The table below is the one the document shows (bottom layer first); a second test reads the
document's table and checks it lists the same layers and modules in the same order, so the
rule and its description stay true together.

What counts as an import (read from the source with :mod:`ast`, nothing is imported):

- ``import gradreg.x``, ``from gradreg.x import y``, relative ones (``from . import x``,
  ``from ..x import y``), resolved to the module they name (``from . import x`` names the
  module ``x`` when it is one, else the package);
- wherever they stand: at the top, inside a function (a lazy import is still a dependency),
  under ``if TYPE_CHECKING:`` (a type is still a dependency). There is no exception list: a
  module that needs one needs a place in the table instead.
- Not seen: names built at run time (``importlib.import_module(f"...{name}")``); gradreg uses
  those only inside a package, to import its own members (penalty families, CLI commands).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "gradreg"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"

# (layer, units), bottom first. A unit is a top-level module (``threat``) or a subpackage with
# everything in it (``penalties/``); ``gradreg`` is the package's own ``__init__`` (the API facade).
LAYERS: list[tuple[str, list[str]]] = [
    ("values", ["threat", "modes", "registry", "config", "stats", "version"]),
    ("runtime", ["distributed", "devices", "autodiff", "progress"]),
    ("models, data", ["models/", "data/", "loading", "inference"]),
    ("attacks", ["attacks/", "judge"]),
    ("clean pass", ["cleanpass", "jacobian"]),
    ("penalties", ["penalties/"]),
    ("scheduling", ["schedule", "objective"]),
    ("training", ["trainer", "trainio", "monitor", "checkpoint", "lock"]),
    ("evaluation", ["protocols/", "report", "runs", "analysis"]),
    ("orchestration", ["reproduce", "tables", "experiment_report", "experiment_figures", "reading", "sweep", "widen", "runner", "experiments/", "frontier", "cost", "api", "plugins", "gradreg"]),
    ("CLI", ["cli", "__main__", "commands/"]),
]
LEVEL = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    """``src/gradreg/penalties/sgr.py`` → ``gradreg.penalties.sgr``; a package's ``__init__`` → the package."""
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SRC.parent / rel).with_suffix(".py").is_file() or (SRC.parent / rel / "__init__.py").is_file()


def unit_of(name: str) -> str:
    """The table's unit of a dotted gradreg module name."""
    parts = name.split(".")
    if len(parts) == 1:
        return "gradreg"
    if (SRC / parts[1]).is_dir():
        return parts[1] + "/"
    return parts[1]


def imports_of(path: Path) -> set[str]:
    """Every gradreg module the file imports (see the module doc for what counts)."""
    return imports_in(path.read_text(encoding="utf-8"), module_name(path), is_package=path.name == "__init__.py")


def imports_in(source: str, name: str, *, is_package: bool) -> set[str]:
    """Every gradreg module that ``source``, the text of module ``name``, imports."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "gradreg")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "gradreg":
                continue
            for alias in node.names:  # ``from pkg import module`` names the module itself
                sub = f"{target}.{alias.name}"
                found.add(sub if is_module(sub) else target)
    return found


def all_modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    missing = sorted({unit_of(module_name(p)) for p in all_modules()} - set(LEVEL))
    assert not missing, f"modules in no layer of docs/ARCHITECTURE.md: {missing}"
    stale = sorted(set(LEVEL) - {unit_of(module_name(p)) for p in all_modules()})
    assert not stale, f"the layer table lists modules that do not exist: {stale}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for path in all_modules():
        name = module_name(path)
        mine = LEVEL[unit_of(name)]
        for target in sorted(imports_of(path)):
            theirs = LEVEL[unit_of(target)]
            if theirs > mine:
                upward.append(f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_penalties_see_only_the_clean_pass() -> None:
    """The penalty/scheduler boundary: a penalty reads the clean pass (gradreg.cleanpass,
    gradreg.jacobian) and never the machinery behind it — the double-backward kernels, the
    collectives (``ctx.ranks`` instead) or the scheduler (legal by layer for the first two,
    refused here)."""
    hidden = {"gradreg.autodiff", "gradreg.distributed", "gradreg.devices", "gradreg.schedule"}
    found = [f"{module_name(p)} imports {t}" for p in sorted((SRC / "penalties").rglob("*.py"))
             for t in sorted(imports_of(p) & hidden)]
    assert not found, "\n".join(found)


def test_the_checker_sees_every_kind_of_import() -> None:
    """The parser itself: relative, ``from . import``, lazy and TYPE_CHECKING imports are found."""
    path = SRC / "penalties" / "sgr.py"  # a real module, so relative names resolve
    found = imports_of(path)
    assert "gradreg.penalties" in found  # from . import PENALTIES
    assert "gradreg.penalties.covariance" in found  # from .covariance import ...
    assert "gradreg.attacks.pgd_core" in found  # from ..attacks.pgd_core import ...
    text = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
            "from . import cleanpass\nimport gradreg.threat\nfrom .penalties import sgr\n"
            "if TYPE_CHECKING:\n    from .trainer import Trainer\n"
            "def f():\n    from .commands import train\n    from .. import nothing\n")
    found = imports_in(text, "gradreg.probe", is_package=False)
    assert {"gradreg.cleanpass", "gradreg.threat", "gradreg.trainer", "gradreg.commands.train",
            "gradreg.penalties.sgr"} <= found
    assert "gradreg.nothing" not in found and "gradreg" not in found  # ``from .. import`` leaves gradreg


def documented_layers() -> list[tuple[str, list[str]]]:
    """The layer table of docs/ARCHITECTURE.md: (layer, backticked modules) per row."""
    rows = []
    in_table = False
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        if line.startswith("| layer |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set(cells[0]) <= {"-", ":"}:
                continue
            rows.append((cells[0], re.findall(r"`([^`]+)`", cells[1])))
    return rows


def test_the_architecture_document_shows_this_table() -> None:
    documented = documented_layers()
    assert documented, "no layer table found in docs/ARCHITECTURE.md"
    assert documented == LAYERS


def test_the_readme_layout_lists_every_module() -> None:
    """README's layout section names every file of src/gradreg (a subpackage's files under it)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = []
    for path in all_modules():
        rel = path.relative_to(SRC)
        names = [rel.name] if len(rel.parts) == 1 else [f"{rel.parts[0]}/"] + (
            [] if rel.name == "__init__.py" else [rel.name])
        missing += [str(rel) for n in names if n not in layout]
    assert not missing, f"README's layout section does not list {sorted(set(missing))}"
