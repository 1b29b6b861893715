"""Jacobian products and the power method for the data-dependent operator norm.

Roth, Kilcher, Hofmann, "Adversarial Training is a Form of Data-dependent Operator Norm
Regularization", NeurIPS 2020 (arXiv 1906.01527): for J = ∂f/∂x of the main head at x,

    ‖J(x)‖_{p,q} = max_{‖v‖ₚ = 1} ‖J(x)v‖_q ,
    v_k = ψ_{p*}( Jᵀ ψ_q( J v_{k−1} ) ),   ψ_r(z) = sign(z)⊙|z|^{r−1} / ‖z‖_r^{r−1}

(ψ is ``ThreatModel.normalize``'s steepest-ascent direction). Jv uses the double-backward trick
(Jv = ∂/∂w [Jᵀw]·v: one forward pass and one ``create_graph`` backward shared by all
iterations) and Jᵀu = ∇ₓ(f(x)·u); every product is an input-gradient pass through the
first-order double-backward kernels of :mod:`gradreg.autodiff`.

Used by the ``opnorm`` penalty (:mod:`gradreg.penalties.opnorm`, which may run it on the
training step's clean pass) and by the per-example norm analysis (:mod:`gradreg.analysis`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .autodiff import GradRequest, efficient_second_order
from .cleanpass import Graph
from .modes import BNPolicy, run_mode
from .threat import canonical_norm, dual_norm, flat_norm
from .threat import steepest_direction as steepest  # ψ_{norm*}: the unit-norm maximizer of ⟨z, ·⟩

__all__ = ["Linearization", "PowerResult", "power_method"]


class PowerResult(NamedTuple):
    sigma: torch.Tensor  # (N,) estimate of ‖J(x)‖_{p,q} = ‖J v‖_q
    u: torch.Tensor  # (N, K) ψ_q(J v), ‖u‖_{q*} = 1
    v: torch.Tensor  # (N, ...) like x, ‖v‖_p = 1


class Linearization:
    """Products with the Jacobian J = ∂f/∂x ``(N, K, d)`` of the model's main head at x, from
    one forward pass (its own, or the one in ``shared``, e.g. the clean pass's
    :meth:`~gradreg.cleanpass.CleanPass.graph_in` when that pass ran in the power method's
    mode). Valid per sample when the samples do not interact (eval mode, or a mode-invariant
    model). Every product is an input-gradient pass (no parameter gradients),
    through convolutions whose double backward uses first-order kernels (gradreg.autodiff)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, shared: Graph | None = None,
                 w0: torch.Tensor | None = None) -> None:
        if shared is not None:
            self.x, self.out, self.req = shared  # (N, ...), (N, K)
        else:
            self.x = x.detach().requires_grad_(True)
            self.req = GradRequest(root=self.x)
            with efficient_second_order(model, self.req):
                self.out = model(self.x)  # (N, K)
        # the cotangent at which Jᵀw is built: its value only matters for jt_w0 (Jv does not depend on it)
        w = torch.zeros_like(self.out) if w0 is None else w0.detach().to(self.out).clone()
        self.w = w.requires_grad_(True)  # (N, K)
        jt_w = None
        if self.out.requires_grad:
            with self.req.inputs_only():
                (jt_w,) = torch.autograd.grad(self.out, self.x, self.w, create_graph=True, retain_graph=True,
                                              allow_unused=True)
        # Jᵀw is linear in w; differentiating it w.r.t. w along v gives Jv.
        self.jt_w = jt_w if jt_w is not None and jt_w.requires_grad else None
        self.jt_w0 = torch.zeros_like(self.x) if self.jt_w is None else self.jt_w.detach()  # Jᵀw0 (N, ...)

    def jv(self, v: torch.Tensor) -> torch.Tensor:  # (N, ...) -> (N, K)
        if self.jt_w is None:
            return torch.zeros_like(self.out)
        with self.req.inputs_only():
            (out,) = torch.autograd.grad(self.jt_w, self.w, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.out) if out is None else out.detach()

    def jtu(self, u: torch.Tensor) -> torch.Tensor:  # (N, K) -> (N, ...)
        if self.jt_w is None:
            return torch.zeros_like(self.x)
        with self.req.inputs_only():
            (out,) = torch.autograd.grad(self.out, self.x, u, retain_graph=True)
        return out.detach()


def _fill_zero_rows(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Replace all-zero rows (no information, a fixed point of the iteration) by random ones."""
    zero = flat_norm(v, "linf") == 0
    if bool(zero.any()):
        v = torch.where(zero.view(-1, *([1] * (v.dim() - 1))), steepest(torch.randn_like(v), norm), v)
    return v


def power_method(model: nn.Module, x: torch.Tensor, *, norm: str = "l2", out_norm: str = "l2",
                 iterations: int = 10, v0: torch.Tensor | None = None, u0: torch.Tensor | None = None,
                 bn_policy: BNPolicy = "eval", shared: Graph | None = None,
                 final_product: bool = True) -> PowerResult:
    """Per-sample (p, q) = (``norm``, ``out_norm``) power method for J(x) of the main head.

    Starts from ``v0`` (like x; random when None) or, when given, from the output-space ``u0``
    ``(N, K)``: then v = ψ_{p*}(Jᵀu0) is the first half-iteration and counts as one of the
    ``iterations`` (≥ 1), and it costs no pass of its own. Runs the model under ``bn_policy``
    and restores its modes; ``shared`` is a forward pass of x that kept its input in the graph,
    to use instead of a pass of its own (it must have run in that mode). Returns detached σ
    ``(N,)``, u ``(N, K)`` and v (like x); with ``final_product=False`` the closing product Jv
    is skipped and σ, u are NaN (for callers that need v alone, one pass cheaper)."""
    norm, out_norm = canonical_norm(norm), canonical_norm(out_norm)
    x = x.detach()
    if u0 is not None:  # a zero row (e.g. kept from a model that ignored its input) restarts at random
        u0 = _fill_zero_rows(steepest(u0.to(x), dual_norm(out_norm)), dual_norm(out_norm))
    with torch.enable_grad(), run_mode(model, bn_policy):
        lin = Linearization(model, x, shared, w0=u0)
        if u0 is None:
            v = _fill_zero_rows(steepest(torch.randn_like(x) if v0 is None else v0.to(x), norm), norm)
        else:
            if iterations < 1:
                raise ValueError(f"a start u0 needs iterations ≥ 1, got {iterations}")
            v = steepest(lin.jt_w0, norm)  # ψ_{p*}(Jᵀu0)
            iterations -= 1
        for _ in range(iterations):
            u = steepest(lin.jv(v), dual_norm(out_norm))  # ψ_q(Jv)
            v = steepest(lin.jtu(u), norm)  # ψ_{p*}(Jᵀu)
        if not final_product:
            nan = torch.full((x.shape[0],), float("nan"), device=x.device, dtype=x.dtype)
            return PowerResult(sigma=nan, u=torch.full_like(lin.out, float("nan")).detach(), v=v)
        jv = lin.jv(v)
    return PowerResult(sigma=flat_norm(jv, out_norm), u=steepest(jv, dual_norm(out_norm)), v=v)
