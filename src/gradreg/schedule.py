"""How one training step is scheduled: the one module that knows about shortcuts.

Penalties compute *what* (a :class:`~gradreg.cleanpass.Term`) from a :class:`CleanPass`;
this module decides *how* the step is computed, behind one switch (``fast_paths``,
``TrainConfig.fast_paths`` / ``--no-fast-paths``):

- **the shared clean pass**: the clean forward pass (and, on demand, the input gradient of
  the task loss) is computed once and shared by the task loss and every penalty;
- **the reuse rule** (applied inside :class:`~gradreg.cleanpass.CleanPass`): a penalty gets a
  result of the clean pass (``ctx.logits_in(model, policy)``, …) instead of running a pass of
  its own under a BatchNorm policy exactly when the two passes compute the same function — the
  model is mode-invariant, or the modes agree;
- **fused mode** (our engineering, same gradient): when every active term needs only a
  *detached* input gradient and none backpropagates through the clean pass (DataGrad's finite
  difference, Lyu's one step, FGSM-AT), one backward pass through the clean graph yields both
  ∇ₓL and ∇θL(x); the step weights the latter by w₀ + Σᵢ λᵢ·cᵢ (each term's ``clean_coeff``
  cᵢ) and adds it through a surrogate Σ_p ⟨p, ∇_pL⟩ whose gradient it is. When that weight is
  0 (Lyu one-step with λ = 1: the objective is exactly L(x + r*)) ∇θL(x) is never computed;
- **first-order double-backward kernels** (:mod:`gradreg.autodiff`) for penalties that
  differentiate a gradient, once they have passed their self-check;
- **rank-independent random numbers** (:class:`BatchNoise`): the same draws for any number of
  ranks (not a shortcut: on in both modes).

With ``fast_paths=False`` the step is the plain composition w₀·L(x) + Σᵢ λᵢ·penaltyᵢ: every
penalty on its own clean pass when it needs an input gradient, no reuse, no fusion, standard
autograd. The test-suite checks that both give the same value and gradient for every
registered penalty.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from . import autodiff
# the clean pass and the types the penalties share live below them (re-exported here)
from .cleanpass import BatchNoise, CleanPass, Requirements, main_targets, own_pass, split_targets, total, with_clean_part
from .models.base import num_heads
from .penalties.base import Penalty

__all__ = ["BatchNoise", "CleanPass", "ObjectiveOutput", "main_targets", "run_objective", "split_targets",
           "total"]


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar, differentiable
    parts: dict[str, torch.Tensor]  # detached scalars: "task" and one per penalty
    logits: torch.Tensor  # clean main-head logits (N, K), for training accuracy


def run_objective(terms: Mapping[str, tuple[Penalty, float]], task_weight: float, model: nn.Module,
                  x: torch.Tensor, y: torch.Tensor, *, index: torch.Tensor | None = None,
                  noise: BatchNoise | None = None, fast_paths: bool = True) -> ObjectiveOutput:
    """w₀·Σ_heads CE(x, y) + Σᵢ λᵢ·penaltyᵢ for one batch, scheduled as the module doc says."""
    if not fast_paths:
        with autodiff.disabled():
            return _run(terms, task_weight, model, x, y, index=index, noise=noise, fast=False)
    return _run(terms, task_weight, model, x, y, index=index, noise=noise, fast=True)


def _run(terms: Mapping[str, tuple[Penalty, float]], task_weight: float, model: nn.Module, x: torch.Tensor,
         y: torch.Tensor, *, index: torch.Tensor | None, noise: BatchNoise | None, fast: bool) -> ObjectiveOutput:
    active = {n: (p, lam) for n, (p, lam) in terms.items() if lam != 0}
    reqs = {n: p.requires for n, (p, _) in active.items()}
    need_grad = fast and any(r.input_grad for r in reqs.values())
    second_order = need_grad and any(r.double_backward for r in reqs.values())
    single_task = y.dim() == 1 and num_heads(model) == 1
    fused = (need_grad and single_task and not any(r.double_backward or r.clean_graph for r in reqs.values()))
    # the weight of ∇θ mean CE(x) once the terms hand theirs over, planned from what they declare
    planned = task_weight + sum(lam * reqs[n].clean_coeff for n, (_, lam) in active.items())
    ctx = CleanPass(model, x, y, need_input_grad=need_grad, second_order=second_order, index=index, noise=noise,
                    fast=fast)
    ctx._fused, ctx._fused_weight = fused, planned
    task = total(ctx.losses())
    parts = {"task": task.detach()}
    penalty = x.new_zeros(())
    clean_w = task_weight
    for name, (pen, lam) in active.items():
        own = own_pass(model, x, y, reqs[name], ctx)
        term = pen.term(model, x, y, own)
        parts[name] = term.value.detach()
        penalty = penalty + lam * term.value
        if own is ctx:  # its clean part joins the shared pass's weight (declared once, in its requirements)
            clean_w += lam * reqs[name].clean_coeff
        else:  # on its own pass: the rule a penalty called alone follows too
            penalty = with_clean_part(penalty, reqs[name], own, weight=lam)
    ctx.finish()
    if not fused:
        # a task weight of 0 (PGD-AT) needs no backward pass through the clean graph
        loss = task_weight * (task if task_weight != 0 else task.detach()) + penalty
        if clean_w != task_weight:
            loss = loss + (clean_w - task_weight) * ctx.clean_delta()
        return ObjectiveOutput(loss=loss, parts=parts, logits=ctx.logits.detach())
    # Fused: the value is the same sum; the gradient of the clean terms is clean_w·∇θL(x),
    # from the input-gradient pass when it ran (ctx.param_grads), else from the clean graph.
    loss = task_weight * task.detach() + penalty
    if ctx.param_grads is not None:
        surrogate = total((p * gp).sum() for p, gp in ctx.param_grads)  # ∇_p = gp
        loss = loss + clean_w * (surrogate - surrogate.detach())
    elif clean_w != 0:
        loss = loss + clean_w * (task - task.detach())
    return ObjectiveOutput(loss=loss, parts=parts, logits=ctx.logits.detach())
