"""Jacobian regularization: the squared Frobenius norm of the input-output Jacobian (SPEC §7).

Hoffman, Roberts, Yaida, "Robust Learning with Jacobian Regularization", arXiv 1908.02729
(2019)::

    R(x) = ‖J(x)‖²_F,   J(x) = ∂f(x)/∂x  (f: the C logits),
    ‖J‖²_F = C·E_v ‖vᵀJ‖²  for v uniform on the unit sphere of R^C
           ≈ (C/K)·Σ_{k=1..K} ‖v_kᵀJ‖²

Each vᵀJ is one backward pass through the logits (∇ₓ⟨v, f(x)⟩), differentiated again in θ
(double backprop). ``projections=K``: K random unit vectors per sample (the paper trains with
K = 1); with K = C the directions are the one-hot basis vectors instead, and R is exact. The
penalty is the batch mean of R; the objective adds λ·R to the clean loss, the paper's
(λ_JR/2)·‖J‖²_F with λ = λ_JR/2.

It reads the shared clean pass's logits and input leaf (``ctx.graph_in``) when the pass offers
them, so it adds K backward passes and no forward pass; otherwise (the plain composition) it
runs a clean pass of its own.

Our choices: ``default_lam`` 0.005 (λ_JR = 0.01, the order of the paper's MNIST runs, not
tuned here); f is the main head; the directions come from the training loop's rank-independent
batch noise (``ctx.noise_like``); the Jacobian is the one of the clean pass's mode (train mode
while training, like the task loss; BatchNorm policy ``frozen`` while training, ``eval``
otherwise: a pass of its own never moves the running statistics).

Example::

    pen = make("jacreg", projections=1)
    loss = F.cross_entropy(model(x), y) + 0.005 * pen(model, x, y)
"""
from __future__ import annotations

import torch
from torch import nn

from ..cleanpass import Graph
from ..modes import BNPolicy
from . import PENALTIES
from .base import CleanPass, Penalty, Requirements, Term


def projection_directions(ctx: CleanPass, logits: torch.Tensor, projections: int) -> list[torch.Tensor]:
    """K direction batches ``(N, C)``: the one-hot basis when K = C, else unit vectors drawn
    uniformly on the sphere (normalized Gaussians) from the batch noise."""
    n, c = logits.shape
    if projections == c:
        eye = torch.eye(c, device=logits.device, dtype=logits.dtype)
        return [eye[k].expand(n, c) for k in range(c)]
    dirs = []
    for _ in range(projections):
        v = ctx.noise_like(torch.randn, logits.detach())  # (N, C)
        dirs.append(v / v.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return dirs


def frobenius_sq(ctx: CleanPass, graph: Graph, projections: int) -> torch.Tensor:
    """Per-sample estimate of ‖J‖²_F ``(N,)`` from ``projections`` vector-Jacobian products
    through the forward pass ``graph`` (logits ``(N, C)`` of the input leaf ``(N, ...)``)."""
    logits = graph.logits
    c = logits.shape[1]
    total = logits.new_zeros(logits.shape[0])
    for v in projection_directions(ctx, logits, projections):
        with graph.request.inputs_only():  # an input-gradient pass, differentiated again in θ
            (vj,) = torch.autograd.grad(logits, graph.x_in, grad_outputs=v, create_graph=True)  # (N, ...) = vᵀJ
        total = total + vj.flatten(1).pow(2).sum(dim=1)
    return total * (c / projections)


def clean_graph(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Graph:
    """The clean pass's graph when ``ctx`` offers it for the clean pass's mode, else a pass of
    its own in that mode (``frozen`` while training: running statistics untouched)."""
    policy: BNPolicy = "frozen" if model.training else "eval"
    shared = ctx.graph_in(model, policy)
    if shared is not None:
        return shared
    own = CleanPass.standalone(model, x, y, need_input_grad=True, index=ctx.index, noise=ctx.noise, fast=False)
    return Graph(x_in=own.x_in, logits=own.logits, request=own.request)


@PENALTIES.register("jacreg")
class JacobianReg(Penalty):
    """Jacobian regularization (Hoffman, Roberts, Yaida 2019): ‖∂f/∂x‖²_F by K random projections (exact at K = C)."""

    default_lam = 0.005
    requires = Requirements(input_grad=True, double_backward=True, clean_graph=True)

    def __init__(self, *, projections: int = 1) -> None:
        super().__init__()
        if projections < 1:
            raise ValueError(f"jacreg projections must be ≥ 1, got {projections!r}")
        self.projections = int(projections)

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        return Term(frobenius_sq(ctx, clean_graph(model, x, y, ctx), self.projections).mean())
