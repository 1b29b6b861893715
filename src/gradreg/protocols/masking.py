"""Signs of gradient masking, read from a :class:`~gradreg.protocols.settings.ModelEval`: the
checks (accuracy falls with ε, unbounded PGD reaches 0 %, PGD is the strongest attack,
AutoAttack close to PGD, the gradient-free Square audit) and the report lines that show them."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import attacks
from ..data import DataBundle
from ..judge import sharded_outcomes
from ..threat import ThreatModel
from .settings import Check, EvalSettings, ModelEval, bits, unbits

AA_GAP = 0.05  # AutoAttack more than 5 points below PGD is a masking sign (our choice)


def masking_lines(evals: Sequence[tuple[str, Sequence[Check]]]) -> list[str]:
    """The report's "Gradient-masking checks" section, one line per (label, check): the one
    writer of these lines for ``gradreg eval`` and ``gradreg reproduce``."""
    lines = ["## Gradient-masking checks", "",
             "Each check reads ok, **FAILED** (a reason to distrust the row's robust numbers) or *not measured* "
             "(the evaluation had no data for it: no ε curve of ≥ 2 radii, no gradient-free audit); *not measured* "
             "is no evidence either way.", ""]
    for label, checks in evals:
        lines += [f"- {label}: {c.status} — {c.name} ({c.detail})" for c in checks]
    return lines


def masking_summary(checks: Sequence[Check]) -> str:
    """A table cell: ``ok``, ``⚠ failed names`` or ``ok (n/m measured)`` when some had no data."""
    failed = sorted({c.name for c in checks if c.failed})
    if failed:
        return "⚠ " + "; ".join(failed)
    unmeasured = {c.name for c in checks if c.passed is None}
    names = {c.name for c in checks}
    return "ok" if not unmeasured else f"ok ({len(names) - len(unmeasured)} of {len(names)} measured)"


def masking_checks(ev: ModelEval, *, tolerance: float = 0.02,
                   transfer: dict[str, list[float]] | None = None) -> list[Check]:
    """Signs of gradient masking (Athalye et al. 2018; Carlini et al. 2019, "On Evaluating
    Adversarial Robustness"): each check that fails is a reason to distrust the numbers.

    - accuracy must not rise with ε: at no ε may it exceed the lowest accuracy at a smaller ε
      by more than ``tolerance``. On the reported curves this can only fire for noise strengths
      (LRC) and curves loaded from elsewhere: radius attacks carry their examples over to larger
      radii and the judge makes their curves monotone. So it is also checked on the raw PGD
      curve (``ev.raw_curves``: every ε attacked afresh, not made monotone), which rises when
      PGD succeeds in a small ball but fails in a larger one — a sign of gradient masking in
      Carlini et al.'s list (2019): a larger perturbation budget must not lower the attack's
      success. The tolerance is the same ``tolerance`` as the other checks (2% of the
      inputs by default, our choice): PGD's random start and step size (∝ ε) make a raw curve
      noisy by a few inputs without any masking. Measured on the digits test models (C&W CNN
      and MLP of tests/conftest.py, all 360 test points, PGD-10 and PGD-40, seeds 0 and 1) the
      raw curve never rose at all and was at most 0.3 points above the cumulative one, so 2%
      leaves room for smaller test sets while a masked model's rise is tens of points;
    - PGD with ε covering the whole input box must reach ≈ 0% (≤ ``tolerance``);
    - noise, single-step and transfer attacks must not beat white-box PGD;
    - AutoAttack, when run, must not be far below PGD (≤ 5 points lower, our choice);
    - a gradient-free attack (Square, Andriushchenko et al. 2020) must not break points that
      every gradient attack (PGD with its restarts, AutoAttack's gradient attacks) left
      standing, on more than ``SQUARE_SHARE`` of the audited points: gradients that are zero
      or useless near the data stop gradient attacks but not a query-based one.

    A check without data (a curve of fewer than 2 radii, no Square audit where AutoAttack ran)
    is reported as not measured (``passed=None``), never as ok.
    """
    tol = tolerance
    checks: list[Check] = []
    curves = {**ev.curves, **{f"raw {a} (every ε attacked afresh)": c for a, c in ev.raw_curves.items()}}
    curves = {a: c for a, c in curves.items() if len(c) >= 2}  # a single radius cannot rise
    rises = [describe_rise(a, ev.eps, c, up) for a, c in curves.items() if (up := rising(ev.eps, c, tol))]
    if not curves:
        checks.append(Check("accuracy falls with ε", None, "not measured: no accuracy curve over ≥ 2 radii"))
    else:
        checks.append(Check("accuracy falls with ε", not rises, "rises: " + "; ".join(rises) if rises else
                            f"ok: {', '.join(curves)} over {len(ev.eps)} radii"))
    if ev.unbounded is not None:
        checks.append(Check("unbounded PGD reaches 0%", ev.unbounded <= tol,
                            f"PGD accuracy with ε covering the whole box: {100 * ev.unbounded:.1f}%"))
    pgd = ev.curves.get("pgd")
    if pgd is not None:
        weaker = [a for a in ev.curves if a in ("uniform", "gaussian", "fgsm", "fgm", "lrc")]
        if transfer:
            weaker_curves = {**{a: ev.curves[a] for a in weaker}, **{f"transfer from {s}": c for s, c in transfer.items()}}
        else:
            weaker_curves = {a: ev.curves[a] for a in weaker}
        beats = [f"{a} at ε={ev.eps[k]:.4g} ({100 * c[k]:.1f}% < {100 * pgd[k]:.1f}%)"
                 for a, c in weaker_curves.items() for k in range(len(c)) if c[k] < pgd[k] - tol]
        checks.append(Check("white-box PGD is the strongest", not beats,
                             "beaten by " + "; ".join(beats) if beats else "ok"))
    if ev.autoattack:
        far = [f"PGD {100 * a['pgd']:.1f}% vs AutoAttack {100 * a['accuracy']:.1f}% at ε={a['eps']:.4g}"
               for a in ev.autoattack if a["pgd"] - a["accuracy"] > AA_GAP]
        detail = "; ".join(far) if far else "ok: " + "; ".join(
            f"PGD {100 * a['pgd']:.1f}% vs AutoAttack {100 * a['accuracy']:.1f}% at ε={a['eps']:.4g}" for a in ev.autoattack)
        checks.append(Check("AutoAttack close to PGD", not far, detail))
        checks.append(square_check(ev))
    return checks


SQUARE_SHARE = 0.02  # Square may break at most 2 % of the audited points that gradient attacks left standing (our choice)


def square_check(ev: ModelEval, *, share: float = SQUARE_SHARE) -> Check:
    """The gradient-free audit (see :func:`masking_checks`) from the AutoAttack entries' ``square``
    record: points Square broke that PGD and AutoAttack both left standing, over the audited
    points; fires above ``share``. Not measured where no entry carries a Square audit."""
    name = "gradient-free attack breaks no more than the gradient attacks"
    audited = [a for a in ev.autoattack or [] if a.get("square")]
    if not audited:
        return Check(name, None, "not measured: no Square audit in this evaluation")
    parts, fired = [], False
    for a in audited:
        sq = unbits(a["square"]["bits"])  # (m,) True: Square left the point standing
        m = sq.numel()
        aa = next(f for e, f in ev.aa_flags.items() if math.isclose(e, float(a["eps"]), rel_tol=1e-5))
        gradient = unbits(a["pgd_bits"])[:m] & aa[:m]  # standing after every gradient attack
        only_square = int((gradient & ~sq).sum())
        fired |= only_square > share * m
        ran = (f", run on the {a['square']['audited']} points both left standing"
               if a["square"].get("after_gradient") else "")
        parts.append(f"Square ({a['square']['n_queries']} queries) broke {only_square} of {m} points that PGD and "
                     f"AutoAttack left standing at ε={a['eps']:.4g} (limit {share:.0%}{ran})")
    return Check(name, not fired, "; ".join(parts))


def run_square_audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat_eps: float, bundle: DataBundle,
                     settings: EvalSettings, *, standing: torch.Tensor | None = None) -> dict[str, Any]:
    """Square (AutoAttack's gradient-free attack, ``settings.square_queries`` queries) on the first
    ``settings.square_n`` points at radius ``threat_eps``, true labels: the masking audit's record
    ``{"n", "n_queries", "bits"}`` (bit i: point i left standing). ``standing`` (bool, one per
    point of ``x``): Square runs only on the points the gradient attacks left standing, the others
    are recorded as broken (``"after_gradient": True`` and the number run, ``"audited"``); the
    audit's count (:func:`square_check`) is the same, since it counts only points that every
    gradient attack left standing."""
    n = min(int(settings.square_n or 0), len(y))
    attack = attacks.make("autoattack", version="custom", attacks=["square"], n_queries=int(settings.square_queries),
                          seed=settings.seed, labels="true")
    threat = ThreatModel(settings.norm, 0.0, bundle.bounds)
    if standing is None:
        flags = sharded_outcomes(model, x[:n], y[:n], attack, threat, [threat_eps], batch_size=settings.batch_size)[0][0]
        return {"n": n, "n_queries": int(settings.square_queries), "bits": bits(flags)}
    flags = torch.zeros(n, dtype=torch.bool)
    idx = standing[:n].nonzero().flatten()  # (m,) the points left to audit
    if len(idx):
        flags[idx] = sharded_outcomes(model, x[idx], y[idx], attack, threat, [threat_eps],
                                      batch_size=settings.batch_size)[0][0]
    return {"n": n, "n_queries": int(settings.square_queries), "bits": bits(flags), "after_gradient": True,
            "audited": int(len(idx))}


def rising(eps: Sequence[float], curve: Sequence[float], tolerance: float) -> list[int]:
    """Indices k where ``curve[k]`` exceeds the lowest value at any smaller ε by more than
    ``tolerance`` (against the running minimum, so a slow climb of many small steps counts)."""
    order = sorted(range(len(curve)), key=lambda k: eps[k])
    out, low = [], math.inf
    for k in order:
        if curve[k] > low + tolerance:
            out.append(k)
        low = min(low, curve[k])
    return out


def describe_rise(name: str, eps: Sequence[float], curve: Sequence[float], up: Sequence[int]) -> str:
    """``name at ε=a, b (x% > y% at a smaller ε)`` for the indices ``up`` found by :func:`rising`."""
    top = max(up, key=lambda k: curve[k])
    low = min((curve[j] for j in range(len(curve)) if eps[j] <= eps[top] and j != top), default=curve[top])
    return (f"{name} at ε={', '.join(f'{eps[k]:.4g}' for k in up)} "
            f"({100 * curve[top]:.1f}% > {100 * low:.1f}% at a smaller ε)")


