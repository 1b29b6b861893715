"""What a training step of each method costs, measured so that noise cannot turn it upside down.

Wall-clock times of whole training runs, run one after another on a shared machine, can show a
method that does strictly more work than clean training as *cheaper* (a background load during
the clean run is enough). Here the methods' training steps are **interleaved in one process**:
every round times one step of each method on the same batch, so a load that comes and goes
affects all of them alike. A method's cost is the median of its per-round ratios to the clean
step of the same round, reported with the interquartile range of those ratios (our choice, as
``benchmarks/penalties.py``); the wall-clock training time is reported separately.

The per-round ratios are kept (``StepCost.ratios``), so a ratio of two methods' costs (e.g. a
regularizer's cost as a share of adversarial training's) carries a 95 % interval from a
**bootstrap over the interleaved rounds** (:func:`relative_cost`): a round is the unit that saw
one load, so rounds are resampled whole, the same rounds for both methods.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

Step = Callable[[], None]


@dataclass(frozen=True)
class StepCost:
    """One method's step time relative to the clean step: median and interquartile range of
    the per-round ratios, and the median step time in seconds."""

    ratio: float
    lo: float
    hi: float
    seconds: float
    rounds: int
    measured: float | None = None  # the measured median, where ``ratio`` is floored (see :func:`floor_at_clean`)
    ratios: tuple[float, ...] = ()  # the per-round ratios behind the median (empty: not kept, older results)

    def text(self) -> str:
        shown = f"{self.ratio:.2f}×" + (f" (measured {self.measured:.2f}×)" if self.measured is not None else "")
        return f"{shown} [{self.lo:.2f}, {self.hi:.2f}]"

    def as_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "lo": self.lo, "hi": self.hi, "seconds": self.seconds, "rounds": self.rounds,
                "measured": self.measured, "ratios": list(self.ratios)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepCost:
        """The inverse of :meth:`as_dict`; results written before the rounds were kept load with no ratios."""
        return cls(ratio=float(d["ratio"]), lo=float(d["lo"]), hi=float(d["hi"]), seconds=float(d["seconds"]),
                   rounds=int(d["rounds"]), measured=d.get("measured"), ratios=tuple(d.get("ratios") or ()))


@dataclass(frozen=True)
class RelativeCost:
    """One method's step cost over another's: the ratio of their medians and, where the rounds
    were kept, its 95 % percentile-bootstrap interval over rounds (None: not measured)."""

    value: float
    interval: tuple[float, float] | None

    def versus(self, bar: float) -> str:
        """"within", "over" or "on the edge of" a cost bar: on the edge when the interval holds it."""
        if self.interval is not None and self.interval[0] <= bar <= self.interval[1]:
            return "on the edge of"
        return "within" if self.value <= bar else "over"

    def text(self) -> str:
        iv = "interval not measured" if self.interval is None else \
            f"95 % interval [{self.interval[0]:.0%}, {self.interval[1]:.0%}] over rounds"
        return f"{self.value:.0%} ({iv})"


def relative_cost(cost: StepCost, reference: StepCost, *, draws: int = 10_000, seed: int = 0) -> RelativeCost:
    """``cost``'s median step ratio over ``reference``'s, with a percentile-bootstrap interval
    over the interleaved rounds (both methods' ratios of a drawn round are taken together). A
    floored cost (:func:`floor_at_clean`) has its floor applied to every draw as well."""
    value = cost.ratio / reference.ratio
    if not cost.ratios or len(cost.ratios) != len(reference.ratios):
        return RelativeCost(value, None)
    a, b = np.asarray(cost.ratios, dtype=float), np.asarray(reference.ratios, dtype=float)
    idx = np.random.default_rng(seed).integers(0, a.size, size=(draws, a.size))
    num, den = np.median(a[idx], axis=1), np.median(b[idx], axis=1)
    if cost.measured is not None:
        num = np.maximum(num, 1.0)
    if reference.measured is not None:
        den = np.maximum(den, 1.0)
    boot = num / den
    return RelativeCost(value, (float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))))


def floor_at_clean(cost: StepCost) -> StepCost:
    """The cost of a method whose step contains the clean step (a forward and backward pass of the
    same batch) and more: its ratio is ≥ 1 by construction, so a measured median below 1 is timing
    noise and is shown as 1, the measurement kept beside it (``measured``) with its interquartile
    range unchanged. Our choice: a cost table never shows more work as cheaper than clean."""
    if cost.ratio >= 1.0:
        return cost
    return StepCost(ratio=1.0, lo=cost.lo, hi=cost.hi, seconds=cost.seconds, rounds=cost.rounds, measured=cost.ratio,
                    ratios=cost.ratios)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def interleaved_costs(steps: Mapping[str, Step], *, reference: str, rounds: int, warmup: int = 1,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, StepCost]:
    """Time ``steps`` round-robin (one call of each per round, ``warmup`` untimed rounds first)
    and return every step's cost relative to ``steps[reference]`` (see the module docstring).
    ``clock`` is injectable: any monotone measure of work (tests count forward passes)."""
    if reference not in steps:
        raise ValueError(f"the reference step {reference!r} is not among {list(steps)}")
    if rounds < 1:
        raise ValueError(f"rounds must be ≥ 1, got {rounds}")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            t0 = clock()
            step()
            if r >= warmup:
                times[name].append(clock() - t0)
    ref = times[reference]
    out = {}
    for name, ts in times.items():
        ratios = [t / c if c > 0 else float("nan") for t, c in zip(ts, ref)]  # the same round: the same load
        lo, hi = _quartiles(ratios)
        out[name] = StepCost(ratio=statistics.median(ratios), lo=lo, hi=hi, seconds=statistics.median(ts),
                             rounds=rounds, ratios=tuple(ratios))
    return out


def training_step(model: nn.Module, objective: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                  lr: float = 1e-3) -> Step:
    """One training step of ``objective`` on a fixed batch, as the training loop takes it
    (train mode, parameter gradients only, an Adam update)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    index = torch.arange(len(y))

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        out = objective(model, x, y, index=index)
        out.loss.backward(inputs=params)
        opt.step()

    return step
