"""The one objective (DataGrad view, Ororbia et al. 2017, SPEC §1):

    J(θ) = w₀·Σ_heads CE_h(x, y) + Σᵢ λᵢ·Rᵢ(model, x, y)

Every method in gradreg is this objective with other terms: ``clean`` has none, GN/SGR/
DataGrad/Lyu add an input-gradient penalty, Madry's PGD-AT sets w₀ = 0 and adds the loss on
PGD examples. The clean forward pass is computed once and shared with every term.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .penalties.base import BatchNoise, CleanPass, Penalty


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar, differentiable
    parts: dict[str, torch.Tensor]  # detached scalars: "task" and one per penalty
    logits: torch.Tensor  # clean main-head logits (N, K), for training accuracy


class Objective(nn.Module):
    """task loss + Σ λᵢ·penaltyᵢ. Penalty state is part of ``state_dict`` (checkpointed)."""

    def __init__(self, terms: Sequence[tuple[str, Penalty, float]], *, task_weight: float = 1.0) -> None:
        super().__init__()
        names = [name for name, _, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"penalty names must be unique, got {names}")
        self.penalties = nn.ModuleDict({name: pen for name, pen, _ in terms})
        self.lams = {name: float(lam) for name, _, lam in terms}
        self.task_weight = float(task_weight)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                index: torch.Tensor | None = None, noise: BatchNoise | None = None) -> ObjectiveOutput:
        active = {n: p for n, p in self.penalties.items() if self.lams[n] != 0}
        need_grad = any(p.needs_input_grad for p in active.values())
        ctx = CleanPass(model, x, y, need_input_grad=need_grad, index=index, noise=noise)
        task = sum(ctx.losses())
        loss = self.task_weight * task
        parts = {"task": task.detach()}
        for name, pen in active.items():
            value = pen(model, x, y, ctx=ctx)
            loss = loss + self.lams[name] * value
            parts[name] = value.detach()
        return ObjectiveOutput(loss=loss, parts=parts, logits=ctx.logits.detach())
