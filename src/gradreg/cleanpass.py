"""What one training step shares between the penalties and the scheduler: the clean pass and
its random numbers, what a penalty requires of the pass and what it gives back.

These are the types both sides of the boundary use, so they live below both: a penalty
(:mod:`gradreg.penalties`) reads a :class:`CleanPass` and returns a :class:`Term`; the
scheduler (:mod:`gradreg.schedule`) plans the step from each penalty's :class:`Requirements`,
builds the pass and adds the terms. The pass offers *results* under the reuse rule
(:meth:`CleanPass.logits_in`, :meth:`CleanPass.detached_input_grad_in`,
:meth:`CleanPass.graph_in`), never the rule itself, so a penalty cannot tell whether it got the
shared pass or a pass of its own. How the pass is computed (first-order double-backward
kernels, :mod:`gradreg.autodiff`; fused mode) is hidden behind it.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from . import distributed
from .autodiff import GradRequest, efficient_second_order
from .models.base import forward_all
from .modes import BNPolicy, mode_invariant, run_mode

__all__ = ["BatchNoise", "CleanPass", "Graph", "RANKS", "Ranks", "Requirements", "Term", "main_targets", "own_pass",
           "split_targets", "total", "with_clean_part"]


@dataclass(frozen=True)
class Requirements:
    """What a penalty needs from the clean pass; the scheduler plans the step from it.

    - ``input_grad``: reads ``ctx.input_grad()`` / ``ctx.detached_input_grad()``;
    - ``double_backward``: differentiates through an input gradient or a Jacobian product (not
      possible under ``torch.compile``);
    - ``clean_graph``: backpropagates through the shared clean pass (its logits or a
      graph-keeping input gradient); a step in which no term does can be fused;
    - ``clean_coeff``: the multiple c of the clean task gradient that belongs to the penalty:
      the penalty is ``value + c·(L(x) − stop_grad(L(x)))`` with L(x) the mean main-task
      cross-entropy of the clean pass and ``value`` its :class:`Term` (−1/φ for DataGrad's
      finite difference, −1 for Lyu's one step, 1 − α for adversarial training's clean half).
      Declared here, once, so that the step can plan the clean parameter gradient before any
      penalty runs (add all clean gradients at once, or skip ∇θL(x) when they cancel);
    - ``input_dependent``: False for penalties of the weights alone (weight decay, spectral norm).
    """

    input_grad: bool = False
    double_backward: bool = False
    clean_graph: bool = True  # conservative default
    clean_coeff: float = 0.0
    input_dependent: bool = True


class Term(NamedTuple):
    """A penalty's value on a batch: it carries the number and every part of the gradient except
    the multiple ``Requirements.clean_coeff`` of the clean task gradient, which the step adds."""

    value: torch.Tensor


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


class Graph(NamedTuple):
    """A forward pass that kept its input in the graph: ``logits = f(x_in)`` of the main head."""

    x_in: torch.Tensor  # (N, ...) leaf, requires grad
    logits: torch.Tensor  # (N, K)
    request: GradRequest  # marks input-gradient passes for the first-order kernels


class Ranks:
    """The data-parallel group a step runs in, for penalty state that must stay identical on
    every rank (SGR's Σ, opnorm's warm-start buffer). Outside torch.distributed both are
    identities. Penalties reach it as ``ctx.ranks``, so they never import the collectives."""

    def average(self, estimates: list[torch.Tensor], count: int) -> list[torch.Tensor]:
        """Each rank's per-sample averages over its ``count`` rows → the averages over the global
        batch (weighted by shard size)."""
        if not distributed.is_active():
            return estimates
        rows = distributed.all_reduce_sum_(torch.tensor([float(count)], dtype=torch.float64,
                                                        device=estimates[0].device))
        return [distributed.all_reduce_sum_(t * count) / rows.to(t.dtype) for t in estimates]

    def gather_rows(self, index: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's ``(index, rows)`` pairs, concatenated: ``(n_all,)``, ``(n_all, ...)``."""
        return distributed.all_gather_rows(index, rows)


RANKS = Ranks()


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
    ``noise_like``, ``sampler``, ``ranks`` and the results under a BatchNorm policy: ``logits_in``,
    ``detached_input_grad_in``, ``graph_in``) and never change how it is computed.
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
        self.ranks = RANKS  # collectives over the data-parallel group
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

    def _may_reuse(self, model: nn.Module, policy: BNPolicy) -> bool:
        """The one rule for reusing this pass: whether a pass of ``model`` under ``policy``
        computes what this pass computed — the model is mode-invariant, or the modes agree.
        Always False on the plain path (``fast=False``). Penalties do not call it: they ask for
        the results below, which apply it."""
        return self.fast and (mode_invariant(model) or (policy == "eval") == (not model.training))

    def logits_in(self, model: nn.Module, policy: BNPolicy) -> torch.Tensor | None:
        """This pass's main-head logits ``(N, K)`` (differentiable) when a pass of ``model`` under
        ``policy`` would compute the same; None when the caller must run that pass itself."""
        return self.logits if self._may_reuse(model, policy) else None

    def detached_input_grad_in(self, model: nn.Module, policy: BNPolicy, head: int = 0) -> torch.Tensor | None:
        """:meth:`detached_input_grad` when this pass has the input gradient and a pass under
        ``policy`` would compute the same (a one-step attack in that mode reads it); else None."""
        if not self.has_input_grad or not self._may_reuse(model, policy):
            return None
        return self.detached_input_grad(head)

    def graph_in(self, model: nn.Module, policy: BNPolicy) -> Graph | None:
        """The input leaf, the main-head logits and the gradient request of this pass, for
        Jacobian products (:mod:`gradreg.jacobian`), when the pass kept its input in the graph
        and a pass under ``policy`` would compute the same; else None."""
        if not self.has_input_grad or not self._may_reuse(model, policy):
            return None
        return Graph(x_in=self.x_in, logits=self.logits, request=self.request)

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


# ----- a penalty on a pass of its own -----------------------------------------------------------
# The one rule, shared by the scheduler (gradreg.schedule) and a penalty called on its own
# (``Penalty.forward``), for a penalty that does not read the shared clean pass: it runs its own
# pass, and the clean part of its term (``clean_coeff``·L(x)) is added from that pass.
def own_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, req: Requirements,
             ctx: CleanPass | None = None) -> CleanPass:
    """The clean pass a penalty with requirements ``req`` reads: ``ctx`` when it has what ``req``
    asks for, else a standalone pass that takes ``ctx``'s example indices, noise and fast-path
    switch (without moving BatchNorm's running statistics)."""
    if ctx is not None and (not req.input_grad or ctx.has_input_grad):
        return ctx
    return CleanPass.standalone(model, x, y, need_input_grad=req.input_grad,
                                index=None if ctx is None else ctx.index,
                                noise=None if ctx is None else ctx.noise,
                                fast=True if ctx is None else ctx.fast)


def with_clean_part(value: torch.Tensor, req: Requirements, own: CleanPass, *, weight: float = 1.0) -> torch.Tensor:
    """``value`` plus the term's declared clean part, (``weight``·``clean_coeff``)·L(x),
    differentiated through ``own`` (the pass the term was computed on); ``weight`` is the
    term's λ when ``value`` is already λ-weighted (the scheduler's sum)."""
    coeff = req.clean_coeff
    return value if coeff == 0 else value + (weight * coeff) * own.clean_delta()
