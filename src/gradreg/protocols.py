"""The evaluation protocols: white-box accuracy over an ε grid, AutoAttack beside PGD, transfer
matrices, DeepFool ρ, LRC curves and gradient-masking checks, for a run or any model.

Metric of the SGR paper (Roth et al. 2018, SPEC §3): accuracy *averaged over an ε grid*,
ε ∈ [0, 32]/255 on MNIST-like data and [0, 8]/255 on CIFAR. The grid has 9 evenly spaced
points including 0 **(our choice; the paper does not state its spacing)**. Attacks use the
model's *predicted* labels (no label leaking) and are judged against the true labels by
:mod:`gradreg.judge`, which never trusts an attack; this module decides what to run.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import attacks, distributed, stats
from .attacks.base import Attack
from .attacks.lrc import covariance_factor, data_covariance, mean_marginal_variance
from .data import DataBundle
from .data.radii import CIFAR_LIKE, default_grid, standard_eps  # noqa: F401  (re-exported)
from .judge import clean_correct, deepfool_rho, evaluate_attack, robust_accuracy, sharded_outcomes
from .stats import Interval
from .threat import ThreatModel, check_eps_fits

AA_GAP = 0.05  # AutoAttack more than 5 points below PGD is a masking sign (our choice)
AA_VERSIONS = ("standard", "rand", "plus", "custom")


@dataclass
class EvalSettings:
    """What ``gradreg eval`` runs. Defaults are the SGR paper's protocol where it has one."""

    norm: str = "linf"
    eps: list[float] | None = None  # None: default_grid(data)
    attacks: tuple[str, ...] = ("fgsm", "pgd", "tpgd", "uniform")
    pgd_steps: int = 40
    pgd_restarts: int = 1  # random starts of the untargeted PGD (a point is broken if any breaks it)
    labels: str = "predicted"  # SGR paper: attack the predicted label
    deepfool: bool = True
    # AutoAttack at the radii aa_eps (None: standard_eps of the data set) on the first aa_n of
    # the evaluated points; aa_params go to the attack (e.g. version="custom", attacks=[...]);
    # aa_cache: a folder where finished batches are kept, so an interrupted run resumes
    autoattack: bool = False
    aa_eps: list[float] | None = None
    aa_version: str = "standard"
    aa_n: int | None = None
    aa_params: dict[str, Any] = field(default_factory=dict)
    aa_cache: str | None = None
    n_test: int | None = None  # evaluate the first n test points only
    batch_size: int = 256
    seed: int = 0
    unbounded_check: bool = True
    tolerance: float = 0.02  # slack of the masking checks, as a fraction of inputs (our choice)
    # PGD attacks every input afresh at every ε (no carry-over) and keeps that raw per-ε curve
    # for the masking check; the reported (cumulative) curve is derived from the same run, so
    # nothing is attacked twice. Cost: every input at every ε > 0 instead of only the inputs
    # still robust (1.5× the PGD time for the digits C&W test model, PGD-40; up to (K−1)× for a
    # model that falls at the first ε). False: the cheaper carry-over run, no raw curve (for PGD
    # the fast bisection sweep of gradreg.attacks.curves, which cannot show a rising curve).
    raw_pgd: bool = True
    # the gradient-free masking audit (square_check): Square with square_queries queries on the
    # first square_n AutoAttack points at every AutoAttack ε (0: not run)
    square_n: int = 0
    square_queries: int = 1000

    def grid(self, data_name: str) -> list[float]:
        return list(self.eps) if self.eps is not None else default_grid(data_name)

    def checked_grid(self, bundle: DataBundle) -> list[float]:
        """The grid, each ε checked against the data's bounds."""
        grid = self.grid(bundle.name)
        for e in grid:
            check_eps_fits(e, self.norm, bundle.bounds, bundle.train_x[0].numel())
        return grid

    def make_attack(self, name: str) -> Attack:
        params: dict[str, Any] = {"labels": self.labels}
        if name in ("pgd", "tpgd", "tpgd-all"):
            params.update(steps=self.pgd_steps, seed=self.seed)
        if name == "pgd" and self.pgd_restarts > 1:
            params["restarts"] = self.pgd_restarts
        elif name in ("uniform", "gaussian", "lrc"):
            params.update(seed=self.seed)
        if name == "fgsm" and self.norm == "l2":
            name = "fgm"
        return attacks.make(name, **params)

    def aa_grid(self, data_name: str) -> list[float]:
        return list(self.aa_eps) if self.aa_eps else [standard_eps(data_name, self.norm)]

    def make_autoattack(self) -> Attack:
        if self.aa_version not in AA_VERSIONS:
            raise ValueError(f"AutoAttack version must be one of {AA_VERSIONS}, got {self.aa_version!r}")
        return attacks.make("autoattack", version=self.aa_version, seed=self.seed, labels="true", **self.aa_params)


@dataclass
class Check:
    """One gradient-masking check; ``passed`` False is shown as a warning, None means the check
    had no data ("not measured", never "ok")."""

    name: str
    passed: bool | None
    detail: str

    @property
    def status(self) -> str:
        return "not measured" if self.passed is None else "ok" if self.passed else "**FAILED**"

    @property
    def failed(self) -> bool:
        return self.passed is False


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


@dataclass
class ModelEval:
    """Accuracies of one model, with the per-example outcomes behind them (for intervals and
    paired tests: point i of every flag tensor is the same test point)."""

    name: str
    eps: list[float]
    clean: float
    curves: dict[str, list[float]]  # attack → accuracy per ε (cumulative over radii: monotone)
    rho: float | None = None
    # one entry per AutoAttack ε: {"eps", "accuracy", "pgd", "n", "interval", "pgd_interval", "run"}
    autoattack: list[dict[str, Any]] | None = None
    unbounded: float | None = None  # PGD accuracy with ε covering the whole input box
    checks: list[Check] = field(default_factory=list)
    # attack → accuracy per ε with every ε attacked independently (no carry-over, not made
    # monotone): the honest curve for "accuracy falls with ε"; PGD only (EvalSettings.raw_pgd)
    raw_curves: dict[str, list[float]] = field(default_factory=dict)
    clean_flags: torch.Tensor | None = None  # (n,) bool: point i classified correctly
    flags: dict[str, torch.Tensor] = field(default_factory=dict)  # attack → (K, n) bool, as curves
    aa_flags: dict[float, torch.Tensor] = field(default_factory=dict)  # AutoAttack ε → (n_aa,) bool

    @property
    def n(self) -> int:
        return int(self.clean_flags.numel()) if self.clean_flags is not None else 0

    def average(self, attack: str) -> float:
        """Accuracy averaged over the ε grid (the SGR paper's metric)."""
        values = self.curves[attack]
        return sum(values) / len(values)

    def scores(self, attack: str) -> torch.Tensor:
        """Each point's accuracy averaged over the ε grid ``(n,)`` (the paired unit of the average)."""
        return self.flags[attack].double().mean(dim=0)

    def clean_interval(self) -> Interval | None:
        return stats.proportion(self.clean_flags) if self.clean_flags is not None and self.n else None

    def curve_intervals(self, attack: str) -> list[Interval] | None:
        """Wilson interval of the accuracy at every ε."""
        if attack not in self.flags or not self.n:
            return None
        return [stats.proportion(row) for row in self.flags[attack]]

    def average_interval(self, attack: str) -> Interval | None:
        """Interval of the grid average (:func:`gradreg.stats.mean_score`)."""
        return stats.mean_score(self.scores(attack)) if attack in self.flags and self.n else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every accuracy with n and its 95 % interval; per-example outcomes as
        0/1 strings (point i is character i)."""
        out: dict[str, Any] = {"name": self.name, "eps": self.eps, "n": self.n, "clean": self.clean,
                               "curves": self.curves, "raw_curves": self.raw_curves, "rho": self.rho,
                               "unbounded": self.unbounded, "autoattack": self.autoattack,
                               "checks": [vars(c) for c in self.checks],
                               "average": {a: self.average(a) for a in self.curves}}
        ci = self.clean_interval()
        out["intervals"] = {
            "clean": ci.as_dict() if ci else None,
            "curves": {a: [iv.as_dict() for iv in ivs] for a in self.curves if (ivs := self.curve_intervals(a))},
            "average": {a: iv.as_dict() for a in self.curves if (iv := self.average_interval(a))},
        }
        out["outcomes"] = {
            "clean": bits(self.clean_flags) if self.clean_flags is not None else None,
            "curves": {a: [bits(row) for row in f] for a, f in self.flags.items()},
            "autoattack": {f"{e:.6g}": bits(f) for e, f in self.aa_flags.items()},
        }
        return out


    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelEval:
        """The inverse of :meth:`to_dict` (intervals are recomputed from the outcomes)."""
        outcomes = d.get("outcomes") or {}
        clean_bits = outcomes.get("clean")
        return cls(name=d["name"], eps=[float(e) for e in d["eps"]], clean=float(d["clean"]),
                   curves={a: [float(v) for v in c] for a, c in d["curves"].items()},
                   raw_curves={a: [float(v) for v in c] for a, c in (d.get("raw_curves") or {}).items()},
                   rho=d.get("rho"), autoattack=d.get("autoattack"), unbounded=d.get("unbounded"),
                   checks=[Check(**c) for c in d.get("checks", [])],
                   clean_flags=unbits(clean_bits) if clean_bits is not None else None,
                   flags={a: torch.stack([unbits(r) for r in rows]) if rows else torch.zeros(0, 0, dtype=torch.bool)
                          for a, rows in (outcomes.get("curves") or {}).items()},
                   aa_flags={float(e): unbits(b) for e, b in (outcomes.get("autoattack") or {}).items()})


def bits(flags: torch.Tensor) -> str:
    """``(n,)`` bool → ``"0110…"`` (compact per-example outcomes in JSON)."""
    return "".join("1" if v else "0" for v in flags.tolist())


def unbits(text: str) -> torch.Tensor:
    """``"0110…"`` → ``(n,)`` bool (the inverse of :func:`bits`)."""
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def test_subset(bundle: DataBundle, n_test: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_test`` test points (the split is already shuffled and stratified)."""
    n = len(bundle.test_y) if n_test is None else min(n_test, len(bundle.test_y))
    return bundle.test_x[:n], bundle.test_y[:n]


def fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameters and buffers (a resumed run must be the same model)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary file and a rename, so that an interrupt
    leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def resumable_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, threat: ThreatModel,
                    eps: float, settings: EvalSettings, *, cache: Path | None, key: dict[str, Any]) -> torch.Tensor:
    """Robust flags ``(N,)`` at one ε, batch by batch; with ``cache`` every finished batch is
    written to that JSON file at once and skipped when the evaluation is run again with the same
    ``key`` (model fingerprint, ε, attack settings, points, batch size). Under torch.distributed
    the batches are sharded as :func:`gradreg.judge.sharded_outcomes` and nothing is cached."""
    if cache is None or distributed.rank_world()[1] > 1:
        return sharded_outcomes(model, x, y, attack, threat, [eps], batch_size=settings.batch_size)[0][0]
    bs = settings.batch_size
    done: dict[str, str] = {}
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            done = saved["batches"] if saved.get("key") == key else {}
        except (ValueError, KeyError, TypeError):  # a torn or foreign file: start afresh
            done = {}
    out = torch.zeros(len(y), dtype=torch.bool)
    for i in range(0, len(y), bs):
        part = done.get(str(i))
        if part is None or len(part) != len(y[i:i + bs]):
            rep = evaluate_attack(model, x[i:i + bs], y[i:i + bs], attack, threat, [eps], batch_size=bs,
                                  progress=False)
            part = bits(rep.robust[0])
            done[str(i)] = part
            write_json_atomic(cache, {"key": key, "batches": done})
        out[i:i + len(part)] = torch.tensor([c == "1" for c in part])
    return out


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


def evaluation_key(model: nn.Module, bundle: DataBundle, settings: EvalSettings, name: str) -> dict[str, Any]:
    """What an evaluation depends on: the model's weights, the data and every setting (the
    AutoAttack cache folder aside: where batches are kept does not change what they hold)."""
    fields = {k: v for k, v in vars(settings).items() if k != "aa_cache"}
    fields["attacks"] = list(fields["attacks"])
    test_fp = hashlib.sha256(bundle.test_x.contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"model": fingerprint(model), "data": bundle.name, "test": test_fp, "name": name,
            "settings": json.loads(json.dumps(fields, default=str))}


def cached_evaluation(model: nn.Module, bundle: DataBundle, settings: EvalSettings, *, cache: Path,
                      name: str = "model", progress: bool | None = None) -> tuple[ModelEval, bool]:
    """:func:`evaluate_model`, kept in the JSON file ``cache``: a second call with the same model,
    data and settings reads the result instead of attacking again (so a long ``reproduce`` that is
    interrupted after its evaluations does not redo them). A torn, foreign or stale file is
    recomputed and replaced. Returns the evaluation and whether it came from the file."""
    key = evaluation_key(model, bundle, settings, name)
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return ModelEval.from_dict(saved["eval"]), True
        except (ValueError, KeyError, TypeError):
            pass
    ev = evaluate_model(model, bundle, settings, name=name, progress=progress)
    write_json_atomic(cache, {"key": key, "eval": ev.to_dict()})
    return ev, False


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, bundle: DataBundle,
                   settings: EvalSettings, result: ModelEval) -> None:
    """AutoAttack at every ε of ``settings.aa_grid`` on the first ``aa_n`` points, beside PGD at
    the same ε on the same points (from the grid's flags when ε is on the grid). One attack
    object for the whole evaluation; finished batches are kept in ``settings.aa_cache``."""
    n = len(y) if settings.aa_n is None else min(settings.aa_n, len(y))
    xa, ya = x[:n], y[:n]
    aa = settings.make_autoattack()
    run = {**aa.describe(), "n": n} if hasattr(aa, "describe") else {"n": n}
    fp = fingerprint(model) if settings.aa_cache else ""
    entries = []
    for e in settings.aa_grid(bundle.name):
        check_eps_fits(e, settings.norm, bundle.bounds, x[0].numel())
        cache = None
        if settings.aa_cache:
            cache = Path(settings.aa_cache) / f"autoattack-{result.name}-{settings.norm}-{e:.6g}.json".replace("/", "_")
        key = {"model": fp, "eps": e, "norm": settings.norm, "n": n, "batch_size": settings.batch_size, **run}
        aa_flags = resumable_flags(model, xa, ya, aa, threat, e, settings, cache=cache, key=key)
        on_grid = [k for k, g in enumerate(result.eps) if math.isclose(g, e, rel_tol=1e-9, abs_tol=1e-12)]
        if on_grid and "pgd" in result.flags:
            pgd_flags = result.flags["pgd"][on_grid[0], :n]
        else:
            pgd_flags = sharded_outcomes(model, xa, ya, settings.make_attack("pgd"), threat, [e],
                                         batch_size=settings.batch_size)[0][0]
        result.aa_flags[e] = aa_flags
        entry = {"eps": e, "accuracy": int(aa_flags.sum()) / n, "pgd": int(pgd_flags.sum()) / n, "n": n,
                 "interval": stats.proportion(aa_flags).as_dict(),
                 "pgd_interval": stats.proportion(pgd_flags).as_dict(),
                 "paired": stats.compare(pgd_flags, aa_flags, a="PGD", b="AutoAttack").as_dict(),
                 "pgd_bits": bits(pgd_flags), "run": run}
        if settings.square_n > 0:
            entry["square"] = run_square_audit(model, xa, ya, e, bundle, settings)
        entries.append(entry)
    result.autoattack = entries


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
        parts.append(f"Square ({a['square']['n_queries']} queries) broke {only_square} of {m} points that PGD and "
                     f"AutoAttack left standing at ε={a['eps']:.4g} (limit {share:.0%})")
    return Check(name, not fired, "; ".join(parts))


def run_square_audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat_eps: float, bundle: DataBundle,
                     settings: EvalSettings) -> dict[str, Any]:
    """Square (AutoAttack's gradient-free attack, ``settings.square_queries`` queries) on the first
    ``settings.square_n`` points at radius ``threat_eps``, true labels: the masking audit's record
    ``{"n", "n_queries", "bits"}`` (bit i: point i left standing)."""
    n = min(int(settings.square_n or 0), len(y))
    attack = attacks.make("autoattack", version="custom", attacks=["square"], n_queries=int(settings.square_queries),
                          seed=settings.seed, labels="true")
    threat = ThreatModel(settings.norm, 0.0, bundle.bounds)
    flags = sharded_outcomes(model, x[:n], y[:n], attack, threat, [threat_eps], batch_size=settings.batch_size)[0][0]
    return {"n": n, "n_queries": int(settings.square_queries), "bits": bits(flags)}


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


class _Precomputed(Attack):
    """Replays adversarial examples crafted elsewhere (a transfer attack) so that the judging
    stays in :func:`gradreg.judge.evaluate_attack`."""

    def __init__(self, x_advs: torch.Tensor, source: str) -> None:
        super().__init__(name=f"pgd from {source}", norms=("linf", "l2", "l1"))
        self.x_advs = x_advs  # (K, N, ...)
        self.offset = 0

    def perturb_multi(self, model, x, y, threat, eps_list, **kwargs):
        out = self.x_advs[:, self.offset:self.offset + len(x)].to(x.device)
        self.offset += len(x)
        return out


def craft(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, threat: ThreatModel,
          eps: Sequence[float], *, batch_size: int) -> torch.Tensor:
    """Adversarial examples ``(K, N, ...)`` for every ε, in batches, on the model's device."""
    dev = next(model.parameters()).device
    # carry_over=False: every input is attacked at every ε, also those the source model already
    # gets wrong — a transferred example must be a real attempt, not the clean input
    return torch.cat([attack.perturb_multi(model, x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev),
                                           threat, eps, carry_over=False).cpu()
                      for i in range(0, len(y), batch_size)], dim=1)


def transfer_flags(models: dict[str, nn.Module], bundle: DataBundle, settings: EvalSettings, *,
                   sources: Sequence[str] | None = None,
                   source_models: dict[str, nn.Module] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``out[source][target]``: ``(K, n)`` bool, target robust at every ε of the grid against PGD
    examples crafted on the source. The source model is ``source_models[source]`` when given (a
    twin: the same method trained with another seed), else ``models[source]`` (white-box on the
    diagonal). Each source's examples are crafted once."""
    x, y = test_subset(bundle, settings.n_test)
    grid = settings.checked_grid(bundle)
    threat = ThreatModel(settings.norm, 0.0, bundle.bounds)
    pgd = settings.make_attack("pgd")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for s in sources if sources is not None else list(models):
        crafter = (source_models or {}).get(s, models.get(s))
        if crafter is None:
            raise ValueError(f"no model for transfer source {s!r}")
        x_advs = craft(crafter, x, y, pgd, threat, grid, batch_size=settings.batch_size)
        out[s] = {}
        for t, target in models.items():
            replay = _Precomputed(x_advs, s)
            rep = evaluate_attack(target, x, y, replay, threat, grid, batch_size=len(y) or 1, progress=False)
            out[s][t] = rep.robust
    return out


def transfer_matrix(models: dict[str, nn.Module], bundle: DataBundle, settings: EvalSettings,
                    *, sources: Sequence[str] | None = None,
                    source_models: dict[str, nn.Module] | None = None) -> dict[str, dict[str, list[float]]]:
    """``out[source][target]`` = accuracy of ``target`` per ε (see :func:`transfer_flags`)."""
    flags = transfer_flags(models, bundle, settings, sources=sources, source_models=source_models)
    return {s: {t: f.double().mean(dim=1).tolist() for t, f in row.items()} for s, row in flags.items()}


def lrc_curves(model: nn.Module, bundle: DataBundle, *, zetas: Sequence[float], eps: Sequence[float],
               samples: int = 100, settings: EvalSettings | None = None,
               marginal_std: float = 1.0) -> dict[float, list[float]]:
    """Accuracy under worst-of-``samples`` LRC noise for every decay length ζ (pixels) and strength ε.

    ``marginal_std`` scales the unit-variance noise (x + ε·s·ξ); :func:`lrc_data_std` gives the
    data-standardized s."""
    settings = settings or EvalSettings()
    x, y = test_subset(bundle, settings.n_test)
    threat = ThreatModel("l2", 0.0, bundle.bounds)  # strength, not a radius: only the bounds apply
    out = {}
    for zeta in zetas:
        attack = attacks.make("lrc", zeta_px=zeta, samples=samples, marginal_std=marginal_std,
                              labels=settings.labels, seed=settings.seed)
        out[float(zeta)] = robust_accuracy(model, x, y, attack, threat, list(eps), batch_size=settings.batch_size)
    return out


def lrc_covariance_curve(model: nn.Module, bundle: DataBundle, *, factor: torch.Tensor, eps: Sequence[float],
                         samples: int = 100, settings: EvalSettings | None = None) -> list[float]:
    """Accuracy per strength ε under worst-of-``samples`` Gaussian noise N(0, F·Fᵀ) — with
    ``factor = lrc_data_factor(bundle)`` the data covariance used as Σ_LRC."""
    settings = settings or EvalSettings()
    x, y = test_subset(bundle, settings.n_test)
    threat = ThreatModel("l2", 0.0, bundle.bounds)
    attack = attacks.make("lrc", factor=factor, samples=samples, labels=settings.labels, seed=settings.seed)
    return robust_accuracy(model, x, y, attack, threat, list(eps), batch_size=settings.batch_size)


def lrc_data_std(bundle: DataBundle) -> float:
    """σ_data: the square root of the training inputs' mean per-pixel variance."""
    return math.sqrt(mean_marginal_variance(bundle.train_x))


def lrc_data_factor(bundle: DataBundle) -> torch.Tensor:
    """F ``(d, d)`` with F·Fᵀ = the covariance of the training inputs (d×d: 3072² for CIFAR)."""
    return covariance_factor(data_covariance(bundle.train_x))
