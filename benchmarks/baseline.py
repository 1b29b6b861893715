"""Timing two gradreg versions side by side in one process (``--baseline`` of the benchmarks).

A refactoring's cost is the ratio of the same method's step times in the old and the new code.
Measured in two separate runs, that ratio is at the mercy of whatever else the machine does;
measured in one process with the two versions' steps adjacent (order alternating per round), a
background load slows both sides of a pair alike and cancels in the per-pair ratio.
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


def load_baseline(src: str) -> ModuleType:
    """Import the ``gradreg`` package under ``src`` as ``gradreg_baseline``. gradreg's own imports
    are relative, so the two versions live side by side (modules reached as
    ``importlib.import_module("gradreg_baseline.penalties")``)."""
    init = Path(src) / "gradreg" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline: {init} does not exist (give the src/ folder of a gradreg checkout)")
    spec = importlib.util.spec_from_file_location("gradreg_baseline", init,
                                                  submodule_search_locations=[str(init.parent)])
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline: cannot import {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gradreg_baseline"] = module
    spec.loader.exec_module(module)
    return module


def ratio_summary(baseline: Sequence[float], current: Sequence[float]) -> str:
    """``median [q1, q3]`` of the per-pair ratios current / baseline."""
    ratios = [c / b for b, c in zip(baseline, current)]
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    return f"{med:.3f} [{q1:.3f}, {q3:.3f}]"
