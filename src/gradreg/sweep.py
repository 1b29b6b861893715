"""λ sweeps on a validation split, one resumable ``gradreg train`` per point.

A sweep trains one method over a grid of λ (and of its ε, where it has one) plus one clean
reference run, all on a validation split carved from the training data
(:mod:`gradreg.data.validation`; the test split is never loaded into a sweep run), and picks λ
by a stated rule. Every point is an ordinary ``gradreg train`` run in a deterministic
directory whose name is derived from its configuration, so

- ``run_points(..., jobs=N)`` runs the unfinished points here as N parallel subprocesses;
- :func:`point_command` is the shell line of one point, for any external scheduler (a SLURM
  array, GNU parallel …); every line passes ``--resume``, so a re-run continues or no-ops;
- :func:`gather` reads whatever has finished; finished runs are never trained again.

There is no scheduler here: running and gathering are separate, and either may happen
elsewhere.

The selection rule is a pure function of the gathered table (:data:`RULES`). The default,
``within-clean``, is the SGR paper's (Roth, Lucchi, Nowozin, Hofmann, "Adversarially Robust
Training through Structured Gradient Regularization", 2018): the best validation PGD accuracy
among the λ whose clean validation accuracy is within ``tolerance_points`` (1) percentage
points of the clean model's.

Example::

    spec = SweepSpec(base=TrainConfig(method="gn", epochs=5, validation_fraction=0.2,
                                      validation_eps=0.1), lams=[0.01, 0.1, 1.0], out="sweeps/gn")
    run_points(sweep_points(spec), jobs=2)
    result = gather(spec)
    write_records(result, spec.out)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, apply_overrides, validation_score
from .report import markdown_table

DEFAULT_VALIDATION_FRACTION = 0.2  # our choice when the base configuration sets none
# configuration fields that say where or how a run executes, not what it computes: left out of
# the run name's hash (the same set ``gradreg train --resume`` lets change)
RUN_LOCATION_FIELDS = ("out", "quiet", "device", "checkpoint_every", "on_nonfinite", "eval_batch_size",
                       "data_dir", "download")
# fields added after run names were first hashed, whose default leaves the trained weights as
# they were (the monitor watches on forked random generators): at their default they are left
# out of the hash, so the run folders of an earlier version keep their names and are reused
NEUTRAL_AT_DEFAULT = ("monitor", "monitor_every_steps", "monitor_points", "monitor_eps", "monitor_drop", "on_overfit",
                      "validation_attack", "validation_lrc_zeta_px", "validation_lrc_samples", "validation_lrc_scale")
RUN_LOG = "sweep-run.log"  # stdout+stderr of a point run by run_points
RUN_EXIT = "sweep-exit.txt"  # its exit code


@dataclass
class SweepSpec:
    """One method's grid. ``eps_values`` (optional) are set through ``eps_key`` (a ``--set``
    key, ``penalty.eps`` for the attack-based methods)."""

    base: TrainConfig
    lams: Sequence[float]
    out: str | Path
    eps_values: Sequence[float] | None = None
    eps_key: str = "penalty.eps"
    rule: str = "within-clean"
    tolerance_points: float = 1.0
    lam_key: str = "lam"  # the configuration key the grid sets: the objective's λ, or a penalty's own weight

    def __post_init__(self) -> None:
        if self.lam_key != "lam" and not self.lam_key.startswith("penalty."):
            raise ConfigError(f"a sweep's λ key is 'lam' or a 'penalty.KEY', got {self.lam_key!r}")
        if not self.lams:
            raise ConfigError("a sweep needs at least one λ")
        if any(not math.isfinite(v) or v < 0 for v in self.lams):
            raise ConfigError(f"λ values must be finite and ≥ 0, got {list(self.lams)}")
        if self.eps_values is not None and any(not math.isfinite(v) or v < 0 for v in self.eps_values):
            raise ConfigError(f"ε values must be finite and ≥ 0, got {list(self.eps_values)}")
        if self.rule not in RULES:
            raise ConfigError(f"unknown selection rule {self.rule!r}; known: {', '.join(RULES)}")
        if self.base.validation_fraction <= 0:
            raise ConfigError("a sweep tunes on a validation split: set validation_fraction > 0")
        if self.base.validation_eps is None:
            raise ConfigError("a sweep needs validation_eps (the ε of the validation PGD accuracy)")


@dataclass
class SweepPoint:
    """One run of the sweep: ``role`` is ``"reference"`` (the clean model) or ``"point"``."""

    name: str
    role: str
    lam: float | None
    eps: float | None
    config: TrainConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)


@dataclass
class SweepRow:
    """A gathered point: ``status`` is ``done``, ``failed`` (exit code in ``note``) or ``pending``."""

    name: str
    role: str
    lam: float | None
    eps: float | None
    status: str
    clean_accuracy: float | None = None
    pgd_accuracy: float | None = None
    train_seconds: float | None = None
    run_dir: str = ""
    note: str = ""


@dataclass
class SweepResult:
    spec: dict[str, Any]
    rule: str
    tolerance_points: float
    reference: SweepRow
    rows: list[SweepRow]
    chosen: SweepRow | None
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)


# ----- run names ------------------------------------------------------------------------------
def config_hash(cfg: TrainConfig) -> str:
    """8 hex digits of SHA-256 over what the run computes (not where it runs)."""
    defaults = TrainConfig().to_dict()
    d = {k: v for k, v in cfg.to_dict().items()
         if k not in RUN_LOCATION_FIELDS and not (k in NEUTRAL_AT_DEFAULT and v == defaults.get(k))}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_name(cfg: TrainConfig, *, eps: float | None = None, swept: float | None = None) -> str:
    """``<method>-lam<λ>[-eps<ε>]-<hash>``: readable, and unique per configuration; λ is the
    swept value (``swept``, for a grid over a penalty's own weight) or the objective's."""
    value = cfg.lam if swept is None else swept
    lam = "-reference" if value is None else f"-lam{value:g}"
    parts = [cfg.method + lam] + ([f"eps{eps:g}"] if eps is not None else [])
    return "-".join(parts + [config_hash(cfg)]).replace("/", "_")


def sweep_points(spec: SweepSpec) -> list[SweepPoint]:
    """The clean reference run first, then every (λ, ε) of the grid, in grid order."""
    runs = Path(spec.out) / "runs"

    def point(role: str, lam: float | None, eps: float | None, overrides: dict[str, Any]) -> SweepPoint:
        cfg = dataclasses.replace(spec.base, penalty=dict(spec.base.penalty), model_params=dict(spec.base.model_params))
        apply_overrides(cfg, overrides)
        cfg.quiet = True
        name = run_name(cfg, eps=eps, swept=lam if spec.lam_key != "lam" else None)
        cfg.out = str(runs / name)
        return SweepPoint(name=name, role=role, lam=lam, eps=eps, config=cfg.validate())

    points = [point("reference", None, None, {"method": "clean", "lam": None, "task_weight": None, "penalty": {}})]
    for eps in (list(spec.eps_values) if spec.eps_values is not None else [None]):
        for lam in spec.lams:
            over: dict[str, Any] = {spec.lam_key: float(lam)}
            if eps is not None:
                over[spec.eps_key] = float(eps)
            points.append(point("point", float(lam), eps, over))
    return points


# ----- commands -------------------------------------------------------------------------------
def toml_literal(value: Any) -> str:
    """``value`` as a TOML literal that ``gradreg train --set key=<literal>`` reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"cannot write the non-finite number {value!r} as a --set value")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (an added term); a None entry is the key's default, left out
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_literal(v)}" for k, v in value.items() if v is not None) + "}"
    raise ValueError(f"cannot write {value!r} as a --set value")


def config_overrides(cfg: TrainConfig) -> list[str]:
    """``key=value`` items for every field that differs from the defaults (dicts per sub-key)."""
    default, items = TrainConfig().to_dict(), []
    for key, value in cfg.to_dict().items():
        if key == "out" or value == default[key]:
            continue
        if isinstance(value, dict):
            items += [f"{key}.{sub}={toml_literal(v)}" for sub, v in value.items()]
        elif value is None:
            raise ValueError(f"cannot reset {key} to its empty value with --set")
        else:
            items.append(f"{key}={toml_literal(value)}")
    return items


def default_launcher() -> list[str]:
    """This interpreter running gradreg's CLI: runnable here whatever is on PATH."""
    return [sys.executable, "-m", "gradreg"]


def train_argv(cfg: TrainConfig, *, launcher: Sequence[str] | None = None) -> list[str]:
    """``gradreg train --resume --out DIR --set ...``: the run ``cfg`` as one resumable command."""
    argv = list(launcher or default_launcher()) + ["train", "--resume", "--out", str(cfg.out)]
    for item in config_overrides(cfg):
        argv += ["--set", item]
    return argv


def point_argv(point: SweepPoint, *, launcher: Sequence[str] | None = None) -> list[str]:
    return train_argv(point.config, launcher=launcher)


def point_command(point: SweepPoint, *, launcher: Sequence[str] | None = None) -> str:
    """One shell line that trains (or resumes, or no-ops on) this point."""
    return shlex.join(point_argv(point, launcher=launcher))


# ----- running and gathering ------------------------------------------------------------------
def is_finished(point: SweepPoint) -> bool:
    metrics = point.run_dir / "metrics.json"
    if not metrics.is_file():
        return False
    try:
        return validation_score(json.loads(metrics.read_text())) is not None
    except json.JSONDecodeError:
        return False


def run_points(points: Sequence[SweepPoint], *, jobs: int = 1, launcher: Sequence[str] | None = None,
               log: Callable[[str], None] = print) -> dict[str, int]:
    """Train the unfinished points as ``jobs`` parallel subprocesses; returns their exit codes.
    Each run's output goes to ``<run>/sweep-run.log`` and its exit code to ``sweep-exit.txt``."""
    todo = [p for p in points if not is_finished(p)]
    if len(todo) < len(points):
        log(f"reusing {len(points) - len(todo)} finished run(s)")
    return run_trainings([(p.name, p.config) for p in todo], jobs=jobs, launcher=launcher, log=log)


def run_trainings(trainings: Sequence[tuple[str, TrainConfig]], *, jobs: int = 1,
                  launcher: Sequence[str] | None = None, log: Callable[[str], None] = print,
                  threads: int | None = None) -> dict[str, int]:
    """Run every ``(label, config)`` as ``gradreg train --resume`` (:func:`train_argv`), ``jobs``
    subprocesses at a time; returns their exit codes by label. ``threads`` (e.g. 1) sets each
    subprocess's OMP/MKL thread count: N one-thread workers use N cores without oversubscribing
    them. Each run's output goes to ``<run>/sweep-run.log``, its exit code to ``sweep-exit.txt``."""
    if jobs < 1:
        raise ValueError(f"jobs must be ≥ 1, got {jobs}")
    env = os.environ.copy()
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def one(item: tuple[str, TrainConfig]) -> tuple[str, int]:
        label, cfg = item
        run_dir = Path(cfg.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / RUN_LOG).open("w") as fh:
            rc = subprocess.run(train_argv(cfg, launcher=launcher), stdout=fh, stderr=subprocess.STDOUT,
                                env=env, check=False).returncode
        (run_dir / RUN_EXIT).write_text(f"{rc}\n")
        log(f"{label}: {'done' if rc == 0 else f'failed (exit {rc}, see {run_dir / RUN_LOG})'}")
        return label, rc

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(one, trainings))


def read_row(point: SweepPoint) -> SweepRow:
    row = SweepRow(name=point.name, role=point.role, lam=point.lam, eps=point.eps, status="pending",
                   run_dir=str(point.run_dir))
    if is_finished(point):
        m = json.loads((point.run_dir / "metrics.json").read_text())
        row.status = "done"
        row.clean_accuracy = float(m["validation_accuracy"])
        row.pgd_accuracy = validation_score(m)  # the validation robust accuracy (PGD, or LRC noise)
        row.train_seconds = float(m.get("train_seconds", float("nan")))
    elif (point.run_dir / RUN_EXIT).is_file():
        rc = (point.run_dir / RUN_EXIT).read_text().strip()
        if rc != "0":
            row.status, row.note = "failed", f"exit {rc}"
    return row


# ----- selection rules (pure functions of the table) ----------------------------------------------
Rule = Callable[[Sequence[SweepRow], float | None, float], tuple[SweepRow | None, str]]


def pick_within_clean(rows: Sequence[SweepRow], clean_accuracy: float | None,
                      tolerance_points: float = 1.0) -> tuple[SweepRow | None, str]:
    """The SGR paper's rule: among finished points whose clean validation accuracy is at least
    ``clean_accuracy − tolerance_points/100``, the best validation PGD accuracy; ties go to the
    higher clean accuracy, then to the smaller λ (our choice). Returns (row or None, reason)."""
    if clean_accuracy is None:
        return None, "the clean reference run has not finished"
    floor = clean_accuracy - tolerance_points / 100
    ok = [r for r in rows if r.status == "done" and r.clean_accuracy is not None and r.clean_accuracy >= floor - 1e-12]
    if not ok:
        return None, f"no finished λ keeps clean validation accuracy ≥ {floor:.4f}"
    best = max(ok, key=lambda r: (r.pgd_accuracy, r.clean_accuracy, -(r.lam or 0.0)))
    return best, (f"best validation PGD accuracy among {len(ok)} λ with clean accuracy ≥ {floor:.4f} "
                  f"(clean model {clean_accuracy:.4f} − {tolerance_points:g} points)")


def pick_best_pgd(rows: Sequence[SweepRow], clean_accuracy: float | None,
                  tolerance_points: float = 1.0) -> tuple[SweepRow | None, str]:
    """The best validation PGD accuracy whatever the clean accuracy; ties to the smaller λ."""
    done = [r for r in rows if r.status == "done"]
    if not done:
        return None, "no point has finished"
    best = max(done, key=lambda r: (r.pgd_accuracy, r.clean_accuracy, -(r.lam or 0.0)))
    return best, "best validation PGD accuracy (no clean-accuracy constraint)"


RULES: dict[str, Rule] = {"within-clean": pick_within_clean, "best-pgd": pick_best_pgd}


def gather(spec: SweepSpec, points: Sequence[SweepPoint] | None = None) -> SweepResult:
    """Read every point's run directory (finished or not) and apply the rule."""
    points = list(points) if points is not None else sweep_points(spec)
    rows = [read_row(p) for p in points]
    reference, grid = rows[0], rows[1:]
    chosen, reason = RULES[spec.rule](grid, reference.clean_accuracy, spec.tolerance_points)
    spec_dict = {"method": spec.base.method, "lams": list(spec.lams), "lam_key": spec.lam_key,
                 "eps_values": list(spec.eps_values) if spec.eps_values is not None else None,
                 "eps_key": spec.eps_key, "base": spec.base.to_dict()}
    return SweepResult(spec=spec_dict, rule=spec.rule, tolerance_points=spec.tolerance_points,
                       reference=reference, rows=grid, chosen=chosen, reason=reason)


# ----- records --------------------------------------------------------------------------------
def _fmt(v: float | None, digits: int = 4) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def to_markdown(result: SweepResult) -> str:
    b = result.spec["base"]
    if b.get("validation_attack", "pgd") == "lrc":
        attack = (f"worst of {b['validation_lrc_samples']} LRC noise draws, ζ = {b['validation_lrc_zeta_px']:g} px, "
                  f"strength ε = {b['validation_eps']:g} ({b['validation_lrc_scale']} scale)")
    else:
        attack = f"PGD {b['validation_norm']} ε = {b['validation_eps']:g}, {b['validation_pgd_steps']} steps"
    lines = [f"# λ sweep: {result.spec['method']} on {b['data']} (validation split {b['validation_fraction']:g} "
             f"of the training data; {attack})", "",
             f"Rule `{result.rule}`: {result.reason}.", "",
             f"Chosen: **λ = {result.chosen.lam:g}**" + (f", ε = {result.chosen.eps:g}" if result.chosen.eps is not None else "")
             if result.chosen else "Chosen: none.", "",
             ]
    rows = []
    for r in [result.reference, *result.rows]:
        mark = " ←" if r is result.chosen else ""
        lam = "clean" if r.role == "reference" else f"{r.lam:g}"
        rows.append([f"{r.name}{mark}", lam, "—" if r.eps is None else f"{r.eps:g}",
                     f"{r.status}{' (' + r.note + ')' if r.note else ''}", _fmt(r.clean_accuracy),
                     _fmt(r.pgd_accuracy), _fmt(r.train_seconds, 1)])
    score = "LRC" if b.get("validation_attack", "pgd") == "lrc" else "PGD"
    lines.append(markdown_table(["run", "λ", "ε", "status", "clean val. acc.", f"{score} val. acc.", "train s"], rows))
    return "\n".join(lines) + "\n"


def plot(result: SweepResult, path: str | Path) -> bool:
    """Validation PGD and clean accuracy against λ (one line pair per ε), the clean model and
    the rule's floor as horizontal lines, the chosen point circled. False if nothing finished."""
    done = [r for r in result.rows if r.status == "done"]
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for eps in sorted({r.eps for r in done}, key=lambda e: -1 if e is None else e):
        rs = sorted((r for r in done if r.eps == eps), key=lambda r: r.lam or 0.0)
        tag = "" if eps is None else f" (ε = {eps:g})"
        lams = [float(r.lam or 0.0) for r in rs]  # finished grid points all have λ and both accuracies
        ax.plot(lams, [float(r.pgd_accuracy or 0.0) for r in rs], "o-", label=f"PGD{tag}")
        ax.plot(lams, [float(r.clean_accuracy or 0.0) for r in rs], "s--", label=f"clean{tag}")
    ref = result.reference.clean_accuracy
    if ref is not None:
        ax.axhline(ref, color="grey", lw=1, label="clean model")
        if result.rule == "within-clean":
            ax.axhline(ref - result.tolerance_points / 100, color="grey", lw=1, ls=":", label="rule's floor")
    if result.chosen is not None:
        ax.plot([float(result.chosen.lam or 0.0)], [float(result.chosen.pgd_accuracy or 0.0)], "o", ms=14, mfc="none", mec="red", label="chosen")
    if all((r.lam or 0) > 0 for r in done):
        ax.set_xscale("log")
    else:
        ax.set_xscale("symlog", linthresh=min((r.lam for r in done if r.lam), default=1.0))
    ax.set_xlabel("λ")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{result.spec['method']}: validation accuracy against λ")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _row_dicts(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The row dictionaries of an ``asdict``-ed :class:`SweepResult` (reference, rows, chosen)."""
    found = [data.get("reference"), data.get("chosen"), *data.get("rows", [])]
    return [r for r in found if isinstance(r, dict)]


def write_records(result: SweepResult, out: str | Path) -> dict[str, Path]:
    """``sweep.json`` (everything), ``sweep.md`` (the table) and ``sweep.png`` (the plot).

    Each row's ``run_dir`` is written relative to ``out``, so the records still point at their
    runs when the whole output folder is moved or copied."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {**dataclasses.asdict(result), "chosen_lam": result.chosen.lam if result.chosen else None,
            "chosen_eps": result.chosen.eps if result.chosen else None}
    for row in _row_dicts(data):
        if row.get("run_dir"):
            row["run_dir"] = os.path.relpath(Path(row["run_dir"]).resolve(), out.resolve())
    paths = {"json": out / "sweep.json", "markdown": out / "sweep.md"}
    paths["json"].write_text(json.dumps(data, indent=2, default=str) + "\n")
    paths["markdown"].write_text(to_markdown(result))
    if plot(result, out / "sweep.png"):
        paths["plot"] = out / "sweep.png"
    return paths
