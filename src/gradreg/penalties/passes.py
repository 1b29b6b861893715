"""Passes the single-step, alignment, curvature and linearity members share: the per-sample
loss and input gradient at a point, under a BatchNorm policy, and at the clean point read off
the shared clean pass when it offers them (:meth:`CleanPass.graph_in`,
:meth:`CleanPass.detached_input_grad_in`), a pass of their own otherwise.

Conventions (our choice, as for GN and DataGrad): ℓ is the *main head's* cross-entropy; the
input gradient of a batch is ∇ₓ Σᵢ ℓ(xᵢ, yᵢ), so row i is sample i's own gradient (not the
gradient of the batch mean, which would scale it by 1/N).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..models.base import forward_all
from ..modes import BNPolicy, run_mode
from .base import CleanPass, main_targets


def main_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Main-head logits ``(N, K)`` of ``model`` at ``x`` (through ``model.__call__``)."""
    return forward_all(model, x)[0]


def loss_and_grad_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, policy: BNPolicy,
                     create_graph: bool, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss ``(N,)`` and input gradient ``(N, ...)`` at ``x`` (detached from its
    history), the model under ``policy``; with ``create_graph`` both are differentiable in θ
    (double backprop), otherwise both are detached.

    A graph-keeping gradient is taken through a :class:`CleanPass` at ``x`` built for second
    order, so with ``fast`` (the step's fast paths; pass ``ctx.fast``) it gets the step's cheap
    double-backward kernels, exactly as the shared clean pass does."""
    with torch.enable_grad(), run_mode(model, policy):
        if create_graph:
            at = CleanPass(model, x.detach(), y, need_input_grad=True, second_order=fast, fast=fast)
            losses = F.cross_entropy(at.logits, main_targets(y), reduction="none")  # (N,)
            g = at.input_grad(0)
            at.finish()  # no more input gradients from this pass
            return losses, g
        xi = x.detach().clone().requires_grad_(True)
        losses = F.cross_entropy(main_logits(model, xi), main_targets(y), reduction="none")  # (N,)
        (g,) = torch.autograd.grad(losses.sum(), xi)
    return losses.detach(), g.detach()


def clean_loss_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass, *,
                        policy: BNPolicy, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`loss_and_grad_at` at the clean ``x``: the shared clean pass when it has an input
    gradient and computes what a pass under ``policy`` computes (the pass offers it), a pass of
    its own otherwise."""
    if create_graph:
        shared = ctx.graph_in(model, policy)
        if shared is not None:
            losses = F.cross_entropy(shared.logits, main_targets(y), reduction="none")  # (N,)
            return losses, ctx.input_grad(0)
    else:
        g = ctx.detached_input_grad_in(model, policy)
        logits = ctx.logits_in(model, policy)
        if g is not None and logits is not None:
            losses = F.cross_entropy(logits, main_targets(y), reduction="none")  # (N,)
            return losses.detach(), g
    return loss_and_grad_at(model, x, y, policy=policy, create_graph=create_graph, fast=ctx.fast)


def uniform_like(ctx: CleanPass, x: torch.Tensor, radius: float) -> torch.Tensor:
    """η ~ U(−radius, radius) shaped like ``x``, from the step's rank-independent noise."""
    return (2 * ctx.noise_like(torch.rand, x) - 1) * radius


def per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨aᵢ, bᵢ⟩ per sample, ``(N, ...) × (N, ...) -> (N,)``."""
    return (a * b).flatten(1).sum(dim=1)
