"""How one training step is scheduled: the one module that knows about shortcuts.

Penalties compute *what* (a :class:`~gradreg.penalties.base.Term`) from a :class:`CleanPass`;
this module decides *how* the step is computed, behind one switch (``fast_paths``,
``TrainConfig.fast_paths`` / ``--no-fast-paths``):

- **the shared clean pass**: the clean forward pass (and, on demand, the input gradient of
  the task loss) is computed once and shared by the task loss and every penalty;
- **the reuse rule** (:meth:`CleanPass.may_reuse`): a penalty may read the clean pass instead
  of running a pass of its own under a BatchNorm policy exactly when the two passes compute
  the same function — the model is mode-invariant, or the modes agree;
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

import functools
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from . import autodiff
from .autodiff import GradRequest, efficient_second_order
from .models.base import forward_all, num_heads
from .modes import BNPolicy, mode_invariant, run_mode

if TYPE_CHECKING:  # the penalties import this module; only their types are needed here
    from .penalties.base import Penalty, Requirements

RandomFn = Callable[..., torch.Tensor]


def split_targets(y: torch.Tensor) -> list[torch.Tensor]:
    """``(N,)`` → ``[y]``; ``(N, T)`` (main label, then auxiliary labels) → T vectors ``(N,)``."""
    if y.dim() == 1:
        return [y]
    return [y[:, t] for t in range(y.shape[1])]


def main_targets(y: torch.Tensor) -> torch.Tensor:
    """Main-task labels ``(N,)`` from ``(N,)`` or ``(N, T)`` targets."""
    return y if y.dim() == 1 else y[:, 0]


def total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ of tensors (what builtin ``sum`` computes, typed as a tensor)."""
    return functools.reduce(operator.add, terms)


class BatchNoise:
    """Random numbers for one training step that do not depend on how the global batch is
    split over ranks: every draw is made for the whole global batch from a generator seeded
    by the step, and each rank keeps its own rows. A 2-rank run then draws exactly what the
    1-rank run draws, and a resumed run what the uninterrupted one drew."""

    def __init__(self, seed: int, rows: torch.Tensor, global_size: int) -> None:
        self.seed = int(seed)
        self.rows = rows.cpu()  # (n_local,) positions of this rank's examples in the global batch
        self.global_size = int(global_size)
        self.calls = 0

    def __call__(self, fn: RandomFn, shape: tuple[int, ...]) -> torch.Tensor:
        """``fn((global_size, *shape[1:]))[rows]`` from a fresh generator per call."""
        if shape[0] != len(self.rows):
            raise ValueError(f"noise for {shape[0]} rows requested, this rank holds {len(self.rows)}")
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.calls) % (2**63))
        self.calls += 1
        return fn((self.global_size, *shape[1:]), generator=gen)[self.rows]

    def like(self, fn: RandomFn, x: torch.Tensor) -> torch.Tensor:
        return self(fn, tuple(x.shape)).to(x.device, x.dtype)


class CleanPass:
    """Lazily computed quantities of a clean batch, shared by the task loss and the penalties.

    ``x_in`` is a leaf copy of ``x`` that requires grad when ``input_grad`` is wanted, so the
    one forward pass serves both the parameter gradient and the input gradient. Penalties read
    it (``logits``, ``outputs``, ``input_grad``, ``detached_input_grad``, ``index``,
    ``noise_like``, ``sampler``, ``may_reuse``) and never change how it is computed.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, need_input_grad: bool = False,
                 second_order: bool = False, index: torch.Tensor | None = None,
                 noise: BatchNoise | None = None, fast: bool = True) -> None:
        self.model = model
        self.x = x
        self.y = y
        self.index = index  # (N,) positions of these examples in the training set, when known
        self.noise = noise  # rank-independent random numbers of this step, inside the training loop
        self.fast = fast  # whether penalties may reuse this pass (False: the plain composition)
        self.x_in = x.detach().clone().requires_grad_(need_input_grad)
        # With second_order, convolutions record nodes whose double backward is cheap
        # (gradreg.autodiff); the request marks input-gradient passes so they skip weights.
        self.request = GradRequest(root=self.x_in)
        if second_order and need_input_grad:
            with efficient_second_order(model, self.request):
                self.outputs = forward_all(model, self.x_in)  # per head: (N, classes_h)
        else:
            self.outputs = forward_all(model, self.x_in)
        self._input_grads: dict[int, torch.Tensor] = {}
        self._detached_grads: dict[int, torch.Tensor] = {}
        # fused mode, planned by run_objective before any penalty runs (see the module doc)
        self._fused = False
        self._fused_weight = 0.0  # weight of ∇θ mean CE(x) in the objective's gradient
        self.param_grads: list[tuple[nn.Parameter, torch.Tensor]] | None = None

    @classmethod
    def standalone(cls, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, need_input_grad: bool,
                   index: torch.Tensor | None = None, noise: BatchNoise | None = None,
                   fast: bool = True) -> CleanPass:
        """A penalty's own clean pass, in the model's mode but without moving BatchNorm's running
        statistics: only the training loop's clean pass does that."""
        with run_mode(model, "frozen" if model.training else "eval"):
            return cls(model, x, y, need_input_grad=need_input_grad, index=index, noise=noise, fast=fast)

    def finish(self) -> None:
        """No more input gradients will be taken from this pass: the training step's backward
        then skips the input gradient of the first convolution (only ``x_in.grad`` wanted it)."""
        self.request.params_only = True

    @property
    def logits(self) -> torch.Tensor:
        return self.outputs[0]

    @property
    def has_input_grad(self) -> bool:
        return self.x_in.requires_grad

    def losses(self, reduction: str = "mean") -> list[torch.Tensor]:
        """Cross-entropy of every head (main first)."""
        return [F.cross_entropy(out, t, reduction=reduction) for out, t in zip(self.outputs, split_targets(self.y))]

    def clean_delta(self) -> torch.Tensor:
        """L(x) − stop_grad(L(x)) for the mean main-task loss: value 0, gradient ∇θL(x). A term's
        ``clean_coeff`` multiplies it in the plain composition."""
        loss = F.cross_entropy(self.logits, main_targets(self.y))
        return loss - loss.detach()

    def may_reuse(self, model: nn.Module, policy: BNPolicy) -> bool:
        """The one rule for reusing this pass: whether a pass of ``model`` under ``policy``
        computes what this pass computed — the model is mode-invariant, or the modes agree.
        Always False on the plain path (``fast=False``)."""
        return self.fast and (mode_invariant(model) or (policy == "eval") == (not model.training))

    def noise_like(self, fn: RandomFn, x: torch.Tensor) -> torch.Tensor:
        """``fn`` (torch.rand / torch.randn) noise shaped like ``x``: rank-independent inside the
        training loop, from the global generator otherwise."""
        if self.noise is not None:
            return self.noise.like(fn, x)
        return fn(x.shape, device=x.device, dtype=x.dtype)

    @property
    def sampler(self) -> BatchNoise | None:
        """The loop's rank-independent sampler for ``ThreatModel.random_start`` (None outside it)."""
        return self.noise

    def input_grad(self, head: int = 0) -> torch.Tensor:
        """g = ∇ₓ Σᵢ CE(f(xᵢ), yᵢ) for one head, shape ``(N, C, H, W)``, with ``create_graph=True``
        so a penalty of g can be differentiated again (double backprop). Summing the per-sample
        losses makes g[i] the gradient of sample i's own loss."""
        if not self.x_in.requires_grad:
            raise RuntimeError("CleanPass was built with need_input_grad=False")
        if head not in self._input_grads:
            loss = F.cross_entropy(self.outputs[head], split_targets(self.y)[head], reduction="sum")
            with self.request.inputs_only():
                (g,) = torch.autograd.grad(loss, self.x_in, create_graph=True)
            # under bf16 autocast the gradient may come back in low precision; norms and
            # quadratic forms of it are computed in float32 (the input's dtype)
            self._input_grads[head] = g.to(self.x_in.dtype)
        return self._input_grads[head]

    def detached_input_grad(self, head: int = 0) -> torch.Tensor:
        """g of :meth:`input_grad`, detached. Reuses the graph-keeping gradient when a term has
        already computed it; otherwise backpropagates once without building a second-order graph
        (in fused mode the same pass also yields the clean parameter gradient)."""
        if not self.x_in.requires_grad:
            raise RuntimeError("CleanPass was built with need_input_grad=False")
        cached = self._input_grads.get(head, self._detached_grads.get(head))
        if cached is not None:
            return cached.detach()
        loss = F.cross_entropy(self.outputs[head], split_targets(self.y)[head], reduction="sum")
        if self._fused and head == 0 and self._fused_weight != 0:
            params = [p for p in self.model.parameters() if p.requires_grad]
            g, *grads = torch.autograd.grad(loss, [self.x_in, *params], allow_unused=True)
            n = self.x_in.shape[0]  # the sum's gradient / N = the mean loss's gradient
            self.param_grads = [(p, gp / n) for p, gp in zip(params, grads) if gp is not None]
        else:
            with self.request.inputs_only():
                (g,) = torch.autograd.grad(loss, self.x_in, retain_graph=not self._fused)
        self._detached_grads[head] = g = g.detach().to(self.x_in.dtype)
        return g


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar, differentiable
    parts: dict[str, torch.Tensor]  # detached scalars: "task" and one per penalty
    logits: torch.Tensor  # clean main-head logits (N, K), for training accuracy


def _penalty_pass(ctx: CleanPass, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  req: Requirements) -> CleanPass:
    """The clean pass a penalty reads: the shared one when it has what the penalty requires."""
    if not req.input_grad or ctx.has_input_grad:
        return ctx
    return CleanPass.standalone(model, x, y, need_input_grad=True, index=ctx.index, noise=ctx.noise,
                                fast=ctx.fast)


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
        own = _penalty_pass(ctx, model, x, y, reqs[name])
        term = pen.term(model, x, y, own)
        penalty = penalty + lam * term.value
        parts[name] = term.value.detach()
        if own is ctx:
            clean_w += lam * term.clean_coeff
        elif term.clean_coeff != 0:
            penalty = penalty + lam * term.clean_coeff * own.clean_delta()
    ctx.finish()
    if not fused:
        # a task weight of 0 (PGD-AT) needs no backward pass through the clean graph
        loss = task_weight * (task if task_weight != 0 else task.detach()) + penalty
        if clean_w != task_weight:
            loss = loss + (clean_w - task_weight) * ctx.clean_delta()
        return ObjectiveOutput(loss=loss, parts=parts, logits=ctx.logits.detach())
    if clean_w != planned:
        raise ValueError(f"a penalty returned a clean_coeff other than its requirements declare "
                         f"(total clean weight {clean_w} ≠ planned {planned}); declare it in Requirements")
    # Fused: the value is the same sum; the gradient of the clean terms is clean_w·∇θL(x),
    # from the input-gradient pass when it ran (ctx.param_grads), else from the clean graph.
    loss = task_weight * task.detach() + penalty
    if ctx.param_grads is not None:
        surrogate = total((p * gp).sum() for p, gp in ctx.param_grads)  # ∇_p = gp
        loss = loss + clean_w * (surrogate - surrogate.detach())
    elif clean_w != 0:
        loss = loss + clean_w * (task - task.detach())
    return ObjectiveOutput(loss=loss, parts=parts, logits=ctx.logits.detach())
