"""The evaluation protocols: white-box accuracy over an ε grid, AutoAttack beside PGD, transfer
matrices, DeepFool ρ, LRC curves and gradient-masking checks, for a run or any model.

Metric of the SGR paper (Roth et al. 2018, SPEC §3): accuracy *averaged over an ε grid*,
ε ∈ [0, 32]/255 on MNIST-like data and [0, 8]/255 on CIFAR. The grid has 9 evenly spaced
points including 0 **(our choice; the paper does not state its spacing)**. Attacks use the
model's *predicted* labels (no label leaking) and are judged against the true labels by
:mod:`gradreg.judge`, which never trusts an attack; this package decides what to run.

A package, one module per seam, because the seams change for different reasons (our choice):

- :mod:`.settings`: what is asked (:class:`EvalSettings`) and what was found (:class:`ModelEval`,
  :class:`Check`); every other module imports it, it imports none of them;
- :mod:`.caching`: fingerprints, atomic JSON, the evaluation key and AutoAttack's per-batch cache;
- one module per protocol: :mod:`.robustness` (the ε grid, ρ, AutoAttack), :mod:`.masking`
  (the checks and the Square audit), :mod:`.transfer`, :mod:`.lrc`.

Callers import from ``gradreg.protocols`` only; the names below are its whole interface.
:func:`cached_evaluation` lives here because it is the one function that joins a protocol
(:func:`evaluate_model`) and the cache, and it calls ``evaluate_model`` through this module's
namespace, so replacing ``gradreg.protocols.evaluate_model`` (as the tests do to prove that a
finished evaluation is read back, not recomputed) reaches it.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..data import DataBundle
from ..data.radii import CIFAR_LIKE, default_grid, standard_eps
from .caching import evaluation_key, fingerprint, resumable_flags, write_json_atomic
from .lrc import lrc_covariance_curve, lrc_curves, lrc_data_factor, lrc_data_std
from .masking import (AA_GAP, SQUARE_SHARE, describe_rise, masking_checks, masking_lines, masking_summary, rising,
                      run_square_audit, square_check)
from .robustness import evaluate_model, run_autoattack
from .settings import AA_VERSIONS, Check, EvalSettings, ModelEval, bits, test_subset, unbits
from .transfer import craft, transfer_flags, transfer_matrix

__all__ = [
    "AA_GAP", "AA_VERSIONS", "CIFAR_LIKE", "Check", "EvalSettings", "ModelEval", "SQUARE_SHARE", "bits",
    "cached_evaluation", "stored_evaluation", "craft", "default_grid", "describe_rise", "evaluate_model", "evaluation_key", "fingerprint",
    "lrc_covariance_curve", "lrc_curves", "lrc_data_factor", "lrc_data_std", "masking_checks", "masking_lines",
    "masking_summary", "resumable_flags", "rising", "run_autoattack", "run_square_audit", "square_check",
    "standard_eps", "test_subset", "transfer_flags", "transfer_matrix", "unbits", "write_json_atomic",
]


def cached_evaluation(model: nn.Module, bundle: DataBundle, settings: EvalSettings, *, cache: Path,
                      name: str = "model", progress: bool | None = None) -> tuple[ModelEval, bool]:
    """:func:`evaluate_model`, kept in the JSON file ``cache``: a second call with the same model,
    data and settings reads the result instead of attacking again (so a long ``reproduce`` that is
    interrupted after its evaluations does not redo them). A torn, foreign or stale file is
    recomputed and replaced. Returns the evaluation and whether it came from the file."""
    stored = stored_evaluation(model, bundle, settings, cache=cache, name=name)
    if stored is not None:
        return stored, True
    ev = evaluate_model(model, bundle, settings, name=name, progress=progress)
    write_json_atomic(cache, {"key": evaluation_key(model, bundle, settings, name), "eval": ev.to_dict()})
    return ev, False


def stored_evaluation(model: nn.Module, bundle: DataBundle, settings: EvalSettings, *, cache: Path,
                      name: str = "model") -> ModelEval | None:
    """The evaluation that ``cache`` holds for exactly this model, data and settings; None when
    the file is absent, torn, foreign or stale."""
    if not cache.is_file():
        return None
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == evaluation_key(model, bundle, settings, name):
            return ModelEval.from_dict(saved["eval"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None

