"""The one objective (DataGrad view, Ororbia et al. 2017, SPEC §1):

    J(θ) = w₀·Σ_heads CE_h(x, y) + Σᵢ λᵢ·Rᵢ(model, x, y)

Every method in gradreg is this objective with other terms: ``clean`` has none, GN/SGR/
DataGrad/Lyu add an input-gradient penalty, Madry's PGD-AT sets w₀ = 0 and adds the loss on
PGD examples. The clean forward pass is computed once and shared with every term.

Fused mode (our engineering, same gradient): when every active term needs only a *detached*
input gradient and none backpropagates through the clean pass (DataGrad's finite difference,
Lyu's one step, FGSM-AT), one backward pass through the clean graph yields both ∇ₓL and
∇θL(x); the objective weights the latter by w₀ + Σᵢ λᵢ·wᵢ (each penalty's ``clean_weight``
wᵢ) and adds it through a surrogate Σ_p ⟨p, ∇_pL⟩ whose gradient it is. When that weight is
0 (Lyu one-step with λ = 1: the objective is exactly L(x + r*)) ∇θL(x) is never computed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .models.base import num_heads
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
        second_order = any(p.uses_double_backward for p in active.values())
        # the weight of ∇θ mean CE(x) in the step's gradient once penalties hand theirs over
        clean_w = self.task_weight + sum(self.lams[n] * p.clean_weight for n, p in active.items())
        single_task = y.dim() == 1 and num_heads(model) == 1
        fused = need_grad and single_task and not second_order and not any(p.uses_clean_graph for p in active.values())
        ctx = CleanPass(model, x, y, need_input_grad=need_grad, second_order=second_order, index=index, noise=noise)
        ctx.fused, ctx.fused_weight = fused, clean_w
        task = sum(ctx.losses())
        parts = {"task": task.detach()}
        penalty = x.new_zeros(())
        for name, pen in active.items():
            value = pen(model, x, y, ctx=ctx)
            penalty = penalty + self.lams[name] * value
            parts[name] = value.detach()
        ctx.finish()
        if not fused:
            # penalties carry their own clean terms; a task weight of 0 (PGD-AT) needs no
            # backward pass through the clean graph
            clean = self.task_weight * (task if self.task_weight != 0 else task.detach())
            return ObjectiveOutput(loss=clean + penalty, parts=parts, logits=ctx.logits.detach())
        # Fused: the value is the same sum; the gradient of the clean terms is clean_w·∇θL(x),
        # from the input-gradient pass when it ran (ctx.param_grads), else from the clean graph.
        loss = self.task_weight * task.detach() + penalty  # the value; the penalties' values hold their −w·L(x)
        if ctx.param_grads is not None:
            surrogate = sum((p * gp).sum() for p, gp in ctx.param_grads)  # ∇_p = gp
            loss = loss + clean_w * (surrogate - surrogate.detach())
        elif clean_w != 0:
            loss = loss + clean_w * (task - task.detach())
        return ObjectiveOutput(loss=loss, parts=parts, logits=ctx.logits.detach())
