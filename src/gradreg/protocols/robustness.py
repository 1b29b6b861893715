"""The robustness protocol: clean accuracy, every attack over the ε grid (PGD also as the raw,
not-carried-over curve), DeepFool ρ, PGD over the whole input box, AutoAttack beside PGD (with
the Square audit) and the masking checks of the result."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .. import stats
from ..data import DataBundle
from ..judge import clean_correct, deepfool_rho, robust_accuracy, sharded_outcomes
from ..threat import ThreatModel, check_eps_fits
from .caching import fingerprint, resumable_flags
from .masking import masking_checks, run_square_audit
from .settings import EvalSettings, ModelEval, bits, test_subset

def evaluate_model(model: nn.Module, bundle: DataBundle, settings: EvalSettings, *, name: str = "model",
                   progress: bool | None = None) -> ModelEval:
    """Clean accuracy, every attack of ``settings`` over the ε grid, ρ, AutoAttack, checks."""
    x, y = test_subset(bundle, settings.n_test)
    grid = settings.checked_grid(bundle)
    threat = ThreatModel(settings.norm, 0.0, bundle.bounds)
    clean_flags = clean_correct(model, x, y, batch_size=settings.batch_size, progress=progress)
    clean = int(clean_flags.sum()) / len(y) if len(y) else math.nan
    curves: dict[str, list[float]] = {}
    raw_curves: dict[str, list[float]] = {}
    flags: dict[str, torch.Tensor] = {}
    for a in settings.attacks:
        # PGD without carry-over gives both curves in one run: the reported one is the
        # cumulative judgement of these independent attempts (the same definition as with carry-over)
        raw_run = a == "pgd" and settings.raw_pgd
        robust, raw = sharded_outcomes(model, x, y, settings.make_attack(a), threat, grid,
                                       batch_size=settings.batch_size, carry_over=False if raw_run else None)
        flags[a] = robust
        curves[a] = robust.double().mean(dim=1).tolist()
        if raw_run:
            raw_curves[a] = raw.double().mean(dim=1).tolist()
    result = ModelEval(name=name, eps=grid, clean=clean, curves=curves, raw_curves=raw_curves,
                       clean_flags=clean_flags, flags=flags)
    if settings.deepfool:
        result.rho = deepfool_rho(model, x, y, bounds=bundle.bounds, norm="l2", labels=settings.labels,
                                  batch_size=settings.batch_size, progress=progress)
    if settings.unbounded_check:
        whole_box = (bundle.bounds[1] - bundle.bounds[0]) * (1.0 if threat.norm == "linf" else math.sqrt(x[0].numel()))
        result.unbounded = robust_accuracy(model, x, y, settings.make_attack("pgd"), threat, [whole_box],
                                           batch_size=settings.batch_size)[0]
    if settings.autoattack:
        run_autoattack(model, x, y, threat, bundle, settings, result)
    result.checks = masking_checks(result, tolerance=settings.tolerance)
    return result


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, bundle: DataBundle,
                   settings: EvalSettings, result: ModelEval) -> None:
    """AutoAttack at every ε of ``settings.aa_grid`` on the first ``aa_n`` points, beside PGD at
    the same ε on the same points (from the grid's flags when ε is on the grid). One attack
    object for the whole evaluation; finished batches are kept in ``settings.aa_cache``. With
    ``settings.aa_after_pgd`` AutoAttack runs only on the points PGD left standing (a point PGD
    broke counts as broken), and the Square audit only on the points both left standing."""
    n = len(y) if settings.aa_n is None else min(settings.aa_n, len(y))
    xa, ya = x[:n], y[:n]
    aa = settings.make_autoattack()
    run = {**aa.describe(), "n": n} if hasattr(aa, "describe") else {"n": n}
    if settings.aa_after_pgd:
        run["after_pgd"] = True
    fp = fingerprint(model) if settings.aa_cache else ""
    entries = []
    for e in settings.aa_grid(bundle.name):
        check_eps_fits(e, settings.norm, bundle.bounds, x[0].numel())
        on_grid = [k for k, g in enumerate(result.eps) if math.isclose(g, e, rel_tol=1e-9, abs_tol=1e-12)]
        if on_grid and "pgd" in result.flags:
            pgd_flags = result.flags["pgd"][on_grid[0], :n]
        else:
            pgd_flags = sharded_outcomes(model, xa, ya, settings.make_attack("pgd"), threat, [e],
                                         batch_size=settings.batch_size)[0][0]
        cache = None
        if settings.aa_cache:
            cache = Path(settings.aa_cache) / f"autoattack-{result.name}-{settings.norm}-{e:.6g}.json".replace("/", "_")
        key = {"model": fp, "eps": e, "norm": settings.norm, "n": n, "batch_size": settings.batch_size, **run}
        if settings.aa_after_pgd:
            key["pgd_bits"] = bits(pgd_flags)  # the points it runs on
            aa_flags = torch.zeros(n, dtype=torch.bool)
            standing = pgd_flags.nonzero().flatten()  # (m,) indices into the first n points
            if len(standing):
                aa_flags[standing] = resumable_flags(model, xa[standing], ya[standing], aa, threat, e, settings,
                                                     cache=cache, key=key)
        else:
            aa_flags = resumable_flags(model, xa, ya, aa, threat, e, settings, cache=cache, key=key)
        result.aa_flags[e] = aa_flags
        entry = {"eps": e, "accuracy": int(aa_flags.sum()) / n, "pgd": int(pgd_flags.sum()) / n, "n": n,
                 "interval": stats.proportion(aa_flags).as_dict(),
                 "pgd_interval": stats.proportion(pgd_flags).as_dict(),
                 "paired": stats.compare(pgd_flags, aa_flags, a="PGD", b="AutoAttack").as_dict(),
                 "pgd_bits": bits(pgd_flags), "run": run}
        if settings.square_n > 0:
            entry["square"] = run_square_audit(model, xa, ya, e, bundle, settings,
                                               standing=(pgd_flags & aa_flags) if settings.aa_after_pgd else None)
        entries.append(entry)
    result.autoattack = entries
