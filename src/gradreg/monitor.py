"""The catastrophic-overfitting monitor of the training loop (:mod:`gradreg.trainer`).

Single-step adversarial training at a large ε can suffer *catastrophic overfitting*: within an
epoch, accuracy under PGD falls to near zero while accuracy under FGSM stays high or rises
(Wong, Rice, Kolter, "Fast is better than free: Revisiting adversarial training", ICLR 2020;
their early stopping, which checks PGD accuracy on a training minibatch once per epoch, is the
rule below). The monitor watches for it in every run, whatever the method.

**What it measures.** At every check it computes, judged by :mod:`gradreg.judge` (clean *and*
adversarially correct), the FGSM accuracy (FGM for ℓ2) and the PGD-10 accuracy (Madry et al.
2018: random start, 10 steps of 0.25·ε, true labels, a fixed attack seed, so every check draws
the same start) at the training ε on one **fixed held-out batch** of
``monitor_points`` = 256 points **(our choice)**:

- with a validation split (``validation_fraction > 0``): a fixed subset of that split;
- without one: a fixed subset of the *training* split, labelled ``"train batch"``. Never the
  test split. Our choice, argued: Wong et al. detect the collapse on a training minibatch
  themselves (the attack the model learnt to defeat fails on the points it was trained on
  first), and carving a held-out slice off the training split would change the training set
  of every run that has the monitor on (the default), i.e. every result gradreg has produced.

The subset is a permutation seeded with :data:`MONITOR_SEED` (independent of the training
seed, so every run of a sweep is watched on the same points).

**Training ε** (``monitor_eps``, input units): given; else the ε and norm of the method's own
threat model when it has one (adversarial training, TRADES/ARR, the operator-norm adversarial
counterpart: the first term of the objective with a ``threat``); else the data set's standard
ℓ∞ radius (:func:`gradreg.data.radii.standard_eps`: 0.3 for the MNIST family, 8/255 for CIFAR)
times the width of its input box.

**The rule** (``monitor_drop`` = 0.20, Wong et al.'s threshold in their early-stopping code): a
check flags catastrophic overfitting when

1. its PGD accuracy is more than ``monitor_drop`` below the best PGD accuracy of any earlier
   check (Wong et al. compare with the previous check only; the best so far also catches a
   collapse spread over several checks: our choice), and
2. its FGSM accuracy has not fallen by more than ``monitor_drop`` from the FGSM accuracy of
   that best check (FGSM holding while PGD collapses is what tells catastrophic overfitting
   from a model that simply got worse: our choice of how to state it).

The first check can never flag. ``on_overfit`` decides what happens next: ``warn`` prints one
line and records the flag, ``stop`` saves and ends training, ``restore`` rolls the model back to
the weights of the last check that was not flagged (Wong et al.'s early stopping keeps the
weights of the previous check) and ends training. The snapshot is the model's whole state dict
(BatchNorm statistics included; not the optimizer's state: training ends there); it is kept in
memory and in the checkpoint (only under ``restore``), so a resumed run restores the same
weights. A run the monitor ended stays ended on ``--resume``.

**Cost and side effects.** One check is 1 + 10 forward-backward passes and a few forward passes
over 256 points. It runs the model in eval mode (BatchNorm uses and never updates its running
statistics; the mode of every submodule is restored: :func:`gradreg.modes.run_mode`), writes no
parameter gradient and draws from no generator of the run (the global generators are forked
around it), so a run with the monitor on trains exactly the weights of the same run with it off.

**The signal for penalties.** After every check the trainer calls
``penalty.on_monitor(fgsm_accuracy=..., pgd_accuracy=..., overfit=..., step=...)`` on every term
of the objective that defines it (an adaptive penalty reads it there; whatever it changes must
live in its buffers so that the checkpoint keeps it).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .threat import ThreatModel, canonical_norm, check_eps_fits

MONITOR_SEED = 0
"""Seed of the held-out subset and of PGD's random start (fixed, our choice)."""
PGD_STEPS = 10  # PGD-10 (our choice; Wong et al.'s early stopping uses 5 steps)
from .config import ON_OVERFIT  # noqa: E402,F401  (re-exported: the choices of on_overfit)
FIELDS = ("monitor_fgsm_accuracy", "monitor_pgd_accuracy", "monitor_overfit")
"""The monitor's columns of the per-epoch log (the last check of the epoch; overfit 1 when any
check of the epoch was flagged)."""


@dataclass
class Check:
    """One measurement: during ``epoch`` (1-based), after global step ``step``."""

    epoch: int
    step: int
    fgsm_accuracy: float
    pgd_accuracy: float
    overfit: bool = False


@dataclass
class MonitorState:
    """Everything the monitor decides from (JSON in the checkpoint: floats round-trip exactly)."""

    checks: list[dict[str, Any]] = field(default_factory=list)
    best_pgd: float | None = None  # best PGD accuracy over the checks so far
    best_fgsm: float | None = None  # FGSM accuracy of that best check
    best_step: int | None = None
    healthy_step: int | None = None  # global step of the last check not flagged (the snapshot's)
    outcome: str | None = None  # "stopped" / "restored": the monitor ended the run

    def overfit_checks(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if c["overfit"]]


def training_threat(terms: Sequence[nn.Module], *, eps: float | None, data_name: str,
                    bounds: tuple[float, float], dim: int) -> ThreatModel:
    """The monitor's threat model (see the module doc: given ε, else the method's, else the
    data set's standard ℓ∞ radius scaled to its box)."""
    norm = "linf"
    method_eps: float | None = None
    for pen in terms:
        threat = getattr(pen, "threat", None)
        if isinstance(threat, ThreatModel) and threat.norm in ("linf", "l2") and threat.eps > 0:
            norm, method_eps = threat.norm, threat.eps
            break
    if eps is None:
        if method_eps is None:
            from .data.radii import standard_eps

            method_eps = standard_eps(data_name, "linf") * (float(bounds[1]) - float(bounds[0]))
        eps = method_eps
    check_eps_fits(eps, norm, bounds, dim)
    return ThreatModel(norm=canonical_norm(norm), eps=eps, bounds=bounds)


def fixed_subset(n: int, points: int) -> torch.Tensor:
    """The first ``points`` rows of a permutation of ``n`` seeded with :data:`MONITOR_SEED`,
    sorted ``(min(points, n),)``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(MONITOR_SEED))
    return order[:points].sort().values


def collapsed(fgsm: float, pgd: float, state: MonitorState, *, drop: float) -> bool:
    """The rule of the module doc, for a new check against the earlier ones."""
    if state.best_pgd is None or state.best_fgsm is None:
        return False
    return state.best_pgd - pgd > drop and state.best_fgsm - fgsm <= drop


class OverfitMonitor:
    """Checks a model on a fixed batch ``(x, y)`` under ``threat``; holds the best-so-far state
    and, when ``keep_snapshot``, the weights of the last healthy check (on the CPU)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *,
                 source: str, drop: float, keep_snapshot: bool, batch_size: int = 500) -> None:
        self.model, self.x, self.y, self.threat = model, x, y, threat
        self.source, self.drop, self.keep_snapshot, self.batch_size = source, drop, keep_snapshot, batch_size
        self.state = MonitorState()
        self.snapshot: dict[str, torch.Tensor] | None = None

    def describe(self) -> dict[str, Any]:
        """What is watched, for the run's metadata."""
        return {"eps": self.threat.eps, "norm": self.threat.norm, "points": len(self.y), "source": self.source,
                "pgd_steps": PGD_STEPS, "drop": self.drop, "seed": MONITOR_SEED}

    def measure(self) -> tuple[float, float]:
        """(FGSM, PGD-10) accuracy on the fixed batch; the same on every rank (the judge shards
        the batches and gathers the outcomes)."""
        from .attacks import make
        from .judge import robust_accuracy

        one_step = make("fgsm" if self.threat.norm == "linf" else "fgm", labels="true")
        pgd = make("pgd", steps=PGD_STEPS, labels="true", seed=MONITOR_SEED)
        devices = [self.x.device] if self.x.device.type == "cuda" else []
        # the run's generators are not touched: the run trains the same weights with or without it
        with torch.random.fork_rng(devices=devices):
            fgsm_acc, = robust_accuracy(self.model, self.x, self.y, one_step, self.threat, [self.threat.eps],
                                        batch_size=self.batch_size, progress=False)
            pgd_acc, = robust_accuracy(self.model, self.x, self.y, pgd, self.threat, [self.threat.eps],
                                       batch_size=self.batch_size, progress=False)
        return fgsm_acc, pgd_acc

    def check(self, *, epoch: int, step: int) -> Check:
        """Measure, apply the rule, update the best-so-far state and the snapshot."""
        fgsm, pgd = self.measure()
        st = self.state
        result = Check(epoch=epoch, step=step, fgsm_accuracy=fgsm, pgd_accuracy=pgd,
                       overfit=collapsed(fgsm, pgd, st, drop=self.drop))
        st.checks.append(asdict(result))
        if st.best_pgd is None or pgd > st.best_pgd:
            st.best_pgd, st.best_fgsm, st.best_step = pgd, fgsm, step
        if not result.overfit:
            st.healthy_step = step
            if self.keep_snapshot:
                self.snapshot = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return result

    def restore_snapshot(self) -> None:
        """Load the weights of the last healthy check into the model."""
        if self.snapshot is None:
            raise RuntimeError("the monitor holds no weights to restore")
        self.model.load_state_dict(self.snapshot)

    def epoch_columns(self, epoch: int) -> dict[str, Any]:
        """The log's monitor columns for ``epoch`` (1-based): its last check, any flag."""
        mine = [c for c in self.state.checks if c["epoch"] == epoch]
        if not mine:
            return dict.fromkeys(FIELDS)
        return {"monitor_fgsm_accuracy": mine[-1]["fgsm_accuracy"], "monitor_pgd_accuracy": mine[-1]["pgd_accuracy"],
                "monitor_overfit": int(any(c["overfit"] for c in mine))}

    def summary(self) -> dict[str, Any]:
        """For metrics.json: what was watched, every flagged check and how the run ended."""
        st = self.state
        return {**self.describe(), "checks": len(st.checks), "overfit": st.overfit_checks(),
                "best_pgd_accuracy": st.best_pgd, "best_step": st.best_step, "outcome": st.outcome or "completed",
                **({"restored_step": st.healthy_step} if st.outcome == "restored" else {})}

    # ----- checkpoint -----------------------------------------------------------------------
    def state_meta(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_meta(self, meta: dict[str, Any] | None, snapshot: dict[str, torch.Tensor] | None) -> None:
        """State from a checkpoint; an older checkpoint without it leaves the monitor fresh."""
        self.state = MonitorState(**meta) if meta else MonitorState()
        self.snapshot = dict(snapshot) if snapshot else None


def warning_line(result: Check, state: MonitorState, monitor: OverfitMonitor, action: str) -> str:
    """The one line printed when a check is flagged."""
    th = monitor.threat
    return (f"warning: catastrophic overfitting at epoch {result.epoch}, step {result.step}: PGD-{PGD_STEPS} "
            f"accuracy {result.pgd_accuracy:.3f} (best {state.best_pgd:.3f} at step {state.best_step}), "
            f"FGSM {result.fgsm_accuracy:.3f}, {th.norm} ε = {th.eps:g}, {len(monitor.y)} {monitor.source} points; "
            f"{action}")



GAP = 0.20
"""FGSM accuracy more than this above PGD-10 accuracy at the last check: the second sign the
report shows (our choice, the drop rule's threshold). The drop rule needs a healthy check to
fall from; a model that overfits to FGSM from its first epoch never has one, but it still ends
with FGSM far above PGD."""


def run_record(metrics: dict[str, Any], log_rows: Sequence[dict[str, str]]) -> dict[str, Any] | None:
    """What a finished run's monitor saw, for reports: the drop rule's flags (``metrics.json``)
    and the last check's FGSM and PGD-10 accuracy (the per-epoch log's monitor columns), with
    the gap sign. None when the run had no monitor."""
    summary = metrics.get("monitor")
    if not summary:
        return None
    last = next((r for r in reversed(log_rows) if r.get("monitor_pgd_accuracy") not in (None, "")), None)
    fgsm = float(last["monitor_fgsm_accuracy"]) if last else None
    pgd = float(last["monitor_pgd_accuracy"]) if last else None
    return {"eps": summary.get("eps"), "norm": summary.get("norm"), "points": summary.get("points"),
            "flags": len(summary.get("overfit") or []), "outcome": summary.get("outcome", "completed"),
            "best_pgd_accuracy": summary.get("best_pgd_accuracy"), "last_fgsm_accuracy": fgsm,
            "last_pgd_accuracy": pgd, "gap": None if fgsm is None or pgd is None else fgsm - pgd,
            "gap_flag": fgsm is not None and pgd is not None and fgsm - pgd > GAP}
