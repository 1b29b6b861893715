"""The judge of an attack: clean and robust accuracy, judged independently of the attack.

(The protocols that run attacks over grids, transfer matrices and AutoAttack are in
:mod:`gradreg.protocols`; they score every attack here.)

The judge never trusts an attack (foolbox 3's rule). For every ε and every input it

1. checks the attack's output: same shape, finite, inside the bounds and — when ε is a radius —
   inside the ε-ball, up to float tolerance (``atol``); a violation raises
   :class:`AttackViolation` (``on_violation="raise"``, the default) or warns (``"warn"``);
2. re-projects the output onto the threat model (ball ∩ bounds; bounds only for a noise
   strength such as LRC's), so tolerated float excess never counts;
3. judges success itself by re-running the model in eval mode on the re-projected point.

An input is robust at ε when it is classified correctly clean *and* at the attack's point.
Since an adversarial example found at a smaller radius lies in every larger ball, robustness is
also made monotone over the radii (robust at ε only if robust at every ε' ≤ ε in the list) —
this only uses points the judge has itself checked. ε = 0 therefore gives the clean accuracy
exactly. The judgements before that step are kept as ``raw_robust``: with
``carry_over=False`` (every input attacked afresh at every ε) they are the honest per-ε curve
that the gradient-masking check "accuracy falls with ε" needs (a curve made monotone cannot
rise).

Everything is batched over the data (``batch_size``), device-agnostic (batches move to the
model's device) and shows a tqdm progress bar on a terminal.

Example::

    from gradreg import ThreatModel, attacks, judge
    threat = ThreatModel("linf", 0.0, bundle.bounds)
    accs = judge.robust_accuracy(model, bundle.test_x, bundle.test_y, attacks.make("pgd"), threat,
                                    [0, 0.1, 0.2], labels="predicted")
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from . import distributed
from .attacks.base import Attack
from .attacks.deepfool import DeepFool
from .devices import comm_device, model_device
from .inference import predict
from .modes import run_mode
from .progress import progress_bar
from .threat import ThreatModel, parse_eps

OnViolation = Literal["raise", "warn"]


class AttackViolation(ValueError):
    """An attack returned points outside its threat model (beyond float tolerance)."""


@dataclass
class AttackReport:
    """Result of :func:`evaluate_attack`. Lists are per ε, in the order given."""

    attack: str
    norm: str
    eps: list[float]
    clean_accuracy: float
    robust_accuracy: list[float]
    robust: torch.Tensor  # (K, N) bool on the CPU: input n is robust at eps[k]
    max_distance: list[float]  # largest ‖x_adv − x‖ the attack returned (before re-projection)
    violations: list[int] = field(default_factory=list)  # points outside ball/bounds beyond tolerance
    raw_robust: torch.Tensor | None = None  # (K, N) bool: the per-ε judgement before monotonicity

    @property
    def raw_accuracy(self) -> list[float]:
        """Accuracy per ε before robustness is made monotone over the radii (see module doc)."""
        raw = self.robust if self.raw_robust is None else self.raw_robust
        return [_fraction(row) for row in raw]

    def rows(self) -> list[dict[str, object]]:
        return [{"attack": self.attack, "norm": self.norm, "eps": e, "accuracy": a}
                for e, a in zip(self.eps, self.robust_accuracy)]


def _fraction(flags: torch.Tensor) -> float:
    """Fraction of True entries, as an exact count / n (no float32 rounding)."""
    return int(flags.sum()) / flags.numel() if flags.numel() else float("nan")


def clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
                  progress: bool | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-example outcomes ``(N,)`` bool on the CPU: ``x[i]`` classified as ``y[i]`` (eval mode)."""
    dev = torch.device(device) if device is not None else model_device(model)
    out = torch.zeros(len(y), dtype=torch.bool)
    with run_mode(model, "eval"), progress_bar(total=len(y), desc="clean", show=progress, unit="img") as bar:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
            out[i:i + batch_size] = (predict(model, xb) == yb).cpu()
            bar.update(len(yb))
    return out


def evaluate_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, threat: ThreatModel,
                    eps_list: Sequence[float | str], *, batch_size: int = 256, labels: str | None = None,
                    progress: bool | None = None, device: torch.device | str | None = None,
                    source_model: nn.Module | None = None, on_violation: OnViolation = "raise",
                    atol: float = 1e-5, carry_over: bool | None = None) -> AttackReport:
    """Run ``attack`` for every ε of ``eps_list`` on ``(x, y)`` in batches and judge it.

    ``labels`` (``"true"``/``"predicted"``) overrides the attack's own label setting.
    ``source_model``: craft the examples on this model and judge them on ``model`` (transfer
    attack); it must live on the same device. ``threat.eps`` is ignored (the list gives ε).
    ``carry_over``: passed to :meth:`Attack.perturb_multi`; ``None`` carries successes over to
    larger radii for a white-box attack and not for a transfer attack. ``False`` attacks every
    input at every ε, so ``raw_robust`` is an independent per-ε judgement.
    """
    if on_violation not in ("raise", "warn"):
        raise ValueError(f"on_violation must be 'raise' or 'warn', got {on_violation!r}")
    eps_values = [parse_eps(e) for e in eps_list]
    if not eps_values:
        raise ValueError("eps_list is empty")
    if labels is not None and labels != attack.labels:
        attack = copy.copy(attack)
        attack.labels = labels  # type: ignore[assignment]  # a checked label mode (the attack validates it)
    attacker = source_model if source_model is not None else model
    dev = torch.device(device) if device is not None else model_device(model)
    n, k = len(y), len(eps_values)
    clean = torch.zeros(n, dtype=torch.bool)
    robust = torch.zeros(k, n, dtype=torch.bool)
    max_dist = [0.0] * k
    violations = [0] * k
    threats = [threat.with_eps(e) for e in eps_values]
    with progress_bar(total=n, desc=attack.name, show=progress, unit="img") as bar:
        for i in range(0, n, batch_size):
            xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
            # a transfer attack cannot know what fools the judged model: no carry-over there
            carry = source_model is None if carry_over is None else carry_over
            x_advs = attack.perturb_multi(attacker, xb, yb, threat, eps_values, carry_over=carry)  # (K, B, ...)
            if tuple(x_advs.shape) != (k, *xb.shape):
                raise AttackViolation(f"attack {attack.name!r} returned shape {tuple(x_advs.shape)}, "
                                      f"expected {(k, *xb.shape)}")
            with run_mode(model, "eval"):
                ok = predict(model, xb) == yb  # (B,)
                clean[i:i + batch_size] = ok.cpu()
                for j, th in enumerate(threats):
                    x_adv = x_advs[j].to(dev).detach()
                    dist = th.distance(xb, x_adv)  # (B,)
                    finite = torch.isfinite(x_adv.flatten(1)).all(dim=1)
                    if attack.eps_is_radius:
                        inside = th.contains(xb, x_adv, atol=atol)
                        max_dist[j] = max(max_dist[j], float(dist.max()) if len(dist) else 0.0)
                    else:  # a noise strength: only the bounds are a constraint
                        flat = x_adv.flatten(1)
                        inside = (flat >= th.lo - atol).all(dim=1) & (flat <= th.hi + atol).all(dim=1)
                    bad = ~(inside & finite)
                    if bool(bad.any()):
                        violations[j] += int(bad.sum())
                        msg = (f"attack {attack.name!r} returned {int(bad.sum())} of {len(yb)} points that are "
                               f"non-finite or outside the {th.norm} ball of radius {th.eps:g} or the bounds "
                               f"{th.bounds} "
                               f"(largest distance {float(dist.max()):.6g}, tolerance {atol:g})")
                        if on_violation == "raise":
                            raise AttackViolation(msg)
                        warnings.warn(msg, stacklevel=2)
                        x_adv = torch.where(finite.view(-1, *([1] * (xb.dim() - 1))), x_adv, xb)
                    x_adv = th.project(xb, x_adv) if attack.eps_is_radius else th.clip(x_adv)
                    robust[j, i:i + batch_size] = (ok & (predict(model, x_adv) == yb)).cpu()
            bar.update(len(yb))
    raw = robust.clone()
    if attack.eps_is_radius:
        # an example found at a smaller radius is a valid one at every larger radius
        order = sorted(range(k), key=lambda j: eps_values[j])
        for prev, cur in zip(order, order[1:]):
            robust[cur] &= robust[prev]
    acc = [_fraction(row) for row in robust]
    return AttackReport(attack=attack.name, norm=threat.norm, eps=eps_values, clean_accuracy=_fraction(clean),
                        robust_accuracy=acc, robust=robust, max_distance=max_dist, violations=violations,
                        raw_robust=raw)


def sharded_outcomes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, threat: ThreatModel,
                     eps_list: Sequence[float | str], *, batch_size: int = 256, labels: str | None = None,
                     progress: bool | None = None, source_model: nn.Module | None = None,
                     on_violation: OnViolation = "raise",
                     carry_over: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example outcomes (robust ``(K, N)``, raw ``(K, N)``) bool on the CPU, judged as
    :func:`evaluate_attack`. Under torch.distributed rank r attacks batches r, r + world, …
    and the outcomes are gathered: every batch sees the same inputs and random draws as in a
    single process, so every rank gets the single-process outcomes."""
    rank, world = distributed.rank_world()
    bs = batch_size
    mine = None if world == 1 else torch.cat(
        [torch.arange(i, min(i + bs, len(y))) for i in range(rank * bs, len(y), world * bs)] or
        [torch.zeros(0, dtype=torch.long)])  # (n_rank,) whole batches, in order
    rep = evaluate_attack(model, x if mine is None else x[mine], y if mine is None else y[mine], attack, threat,
                          eps_list, batch_size=bs, labels=labels, progress=progress, source_model=source_model,
                          on_violation=on_violation, carry_over=carry_over)
    raw = rep.robust if rep.raw_robust is None else rep.raw_robust
    if mine is None:
        return rep.robust, raw
    k = len(rep.eps)
    comm = comm_device(model_device(model))
    both = torch.cat([rep.robust, raw]).t().contiguous()  # (n_rank, 2K): one gather for both curves
    idx, rows = distributed.all_gather_rows(mine.to(comm), both.to(comm))
    rows = rows.cpu()[idx.cpu().argsort()].bool().t()  # (2K, N) in the original order
    return rows[:k].contiguous(), rows[k:].contiguous()


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, threat: ThreatModel,
                    eps_list: Sequence[float | str], *, batch_size: int = 256, labels: str | None = None,
                    progress: bool | None = None, source_model: nn.Module | None = None,
                    on_violation: OnViolation = "raise") -> list[float]:
    """Robust accuracy for every ε of ``eps_list`` (judged as :func:`evaluate_attack`; sharded
    over ranks under torch.distributed as :func:`sharded_outcomes`)."""
    robust, _ = sharded_outcomes(model, x, y, attack, threat, eps_list, batch_size=batch_size, labels=labels,
                                 progress=progress, source_model=source_model, on_violation=on_violation)
    return [_fraction(row) for row in robust]


def deepfool_rho(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, bounds: tuple[float, float],
                 norm: str = "l2", labels: str = "predicted", batch_size: int = 256, progress: bool | None = None,
                 device: torch.device | str | None = None, **deepfool_params: object) -> float:
    """DeepFool robustness ρ = mean ‖r‖₂/‖x‖₂ over the inputs (Moosavi-Dezfooli et al. 2016).

    r is DeepFool's minimal perturbation (``norm`` picks the ℓ2 or ℓ∞ variant; ρ always uses
    ‖·‖₂, as the SGR paper's tables). Predicted labels by default, as in the paper: every input
    is pushed across its own decision boundary. Inputs with ‖x‖₂ = 0 are left out.
    """
    attack = DeepFool(labels=labels, **deepfool_params)  # type: ignore[arg-type]  # DeepFool's keywords, checked by its constructor
    threat = ThreatModel(norm, 0.0, bounds)
    dev = torch.device(device) if device is not None else model_device(model)
    ratios = []
    with progress_bar(total=len(y), desc="deepfool", show=progress, unit="img") as bar:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
            r = attack.minimal(model, xb, yb, threat) - xb
            size = xb.flatten(1).norm(dim=1)
            keep = size > 0
            ratios.append((r.flatten(1).norm(dim=1)[keep] / size[keep]).cpu())
            bar.update(len(yb))
    return float(torch.cat(ratios).mean()) if ratios else float("nan")
