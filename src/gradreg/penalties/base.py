"""The penalty interface and the clean pass that penalties share with the task loss.

A penalty is an ``nn.Module`` called as ``penalty(model, x, y)`` that returns a scalar tensor
(mean over the batch). Its state (e.g. SGR's Σ estimate, warm-start vectors) lives in
buffers, so ``state_dict()`` / ``load_state_dict()`` checkpoint it exactly.

Inside the training loop the objective passes ``ctx=CleanPass(...)``: the clean forward pass
(and, on demand, the input gradient of the task loss) is then computed once and shared by the
task loss and every penalty, instead of once per term. Called without ``ctx`` a penalty
builds its own.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..autodiff import GradRequest, efficient_second_order
from ..models.base import forward_all
from ..modes import BNPolicy, mode_invariant, run_mode


def split_targets(y: torch.Tensor) -> list[torch.Tensor]:
    """``(N,)`` → ``[y]``; ``(N, T)`` (main label, then auxiliary labels) → T vectors ``(N,)``."""
    if y.dim() == 1:
        return [y]
    return [y[:, t] for t in range(y.shape[1])]


def main_targets(y: torch.Tensor) -> torch.Tensor:
    """Main-task labels ``(N,)`` from ``(N,)`` or ``(N, T)`` targets."""
    return y if y.dim() == 1 else y[:, 0]


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

    def __call__(self, fn, shape: tuple[int, ...]) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """``fn((global_size, *shape[1:]))[rows]`` from a fresh generator per call."""
        if shape[0] != len(self.rows):
            raise ValueError(f"noise for {shape[0]} rows requested, this rank holds {len(self.rows)}")
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.calls) % (2**63))
        self.calls += 1
        return fn((self.global_size, *shape[1:]), generator=gen)[self.rows]

    def like(self, fn, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return self(fn, tuple(x.shape)).to(x.device, x.dtype)


def noise_like(ctx: CleanPass | None, fn, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``fn`` (torch.rand / torch.randn) noise shaped like ``x``: rank-independent inside the
    training loop, from the global generator otherwise."""
    if ctx is not None and ctx.noise is not None:
        return ctx.noise.like(fn, x)
    return fn(x.shape, device=x.device, dtype=x.dtype)


def sampler_of(ctx: CleanPass | None) -> BatchNoise | None:
    """The loop's rank-independent sampler for ``ThreatModel.random_start`` (None outside it)."""
    return None if ctx is None else ctx.noise


class CleanPass:
    """Lazily computed quantities of a clean batch, shared by the task loss and the penalties.

    ``x_in`` is a leaf copy of ``x`` that requires grad when ``input_grad`` is wanted, so the
    one forward pass serves both the parameter gradient and the input gradient.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, need_input_grad: bool = False,
                 second_order: bool = False, index: torch.Tensor | None = None,
                 noise: BatchNoise | None = None) -> None:
        self.model = model
        self.x = x
        self.y = y
        self.index = index  # (N,) positions of these examples in the training set, when known
        self.noise = noise  # rank-independent random numbers of this step, inside the training loop
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
        # Fused mode (set by the objective when no term backpropagates through this pass): the
        # first input-gradient pass also returns the parameter gradient of the mean main-task
        # loss, so the step needs no second backward through the clean graph. Penalties then
        # leave their multiple of ∇θL(x) (``Penalty.clean_weight``) to the objective.
        self.fused = False
        self.fused_weight = 0.0  # weight of ∇θ mean CE(x) in the objective's gradient
        self.param_grads: list[tuple[nn.Parameter, torch.Tensor]] | None = None

    def finish(self) -> None:
        """No more input gradients will be taken from this pass: the training step's backward
        then skips the input gradient of the first convolution (only ``x_in.grad`` wanted it)."""
        self.request.params_only = True

    @property
    def logits(self) -> torch.Tensor:
        return self.outputs[0]

    def losses(self, reduction: str = "mean") -> list[torch.Tensor]:
        """Cross-entropy of every head (main first)."""
        return [F.cross_entropy(out, t, reduction=reduction) for out, t in zip(self.outputs, split_targets(self.y))]

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
        already computed it; otherwise backpropagates once without building a second-order graph."""
        cached = self._input_grads.get(head, self._detached_grads.get(head))
        if cached is not None:
            return cached.detach()
        loss = F.cross_entropy(self.outputs[head], split_targets(self.y)[head], reduction="sum")
        if self.fused and head == 0 and self.fused_weight != 0:
            params = [p for p in self.model.parameters() if p.requires_grad]
            g, *grads = torch.autograd.grad(loss, [self.x_in, *params], allow_unused=True)
            n = self.x_in.shape[0]  # the sum's gradient / N = the mean loss's gradient
            self.param_grads = [(p, gp / n) for p, gp in zip(params, grads) if gp is not None]
        else:
            with self.request.inputs_only():
                (g,) = torch.autograd.grad(loss, self.x_in, retain_graph=not self.fused)
        self._detached_grads[head] = g = g.detach().to(self.x_in.dtype)
        return g

    def shares_mode(self, model: nn.Module, policy: BNPolicy) -> bool:
        """Whether a pass of ``model`` under ``policy`` computes what this (clean) pass computed, so
        a penalty may reuse it: the model is mode-invariant, or the modes agree."""
        return mode_invariant(model) or (policy == "eval") == (not model.training)


class Penalty(nn.Module):
    """Base class of every regularizer in the registry.

    Class attributes describe the method to the objective and to the test-suite:

    - ``needs_input_grad``: the penalty reads ``ctx.input_grad()`` (so the clean pass must keep
      the input in the graph).
    - ``double_backward``: the penalty differentiates through an input gradient or a
      Jacobian product (not possible under ``torch.compile``); defaults to ``needs_input_grad``.
    - ``default_lam``: λ when the user gives none.
    - ``task_weight``: weight of the clean task loss when this penalty is the method (1 for a
      regularizer; Madry's PGD-AT uses 0, the Goodfellow mix α).
    - ``input_dependent``: False for penalties of the weights alone (weight decay, spectral
      norm), which the "zero for a model that ignores its input" test skips.
    - ``uses_clean_graph``: the value is differentiated through the shared clean pass (its
      logits or a graph-keeping input gradient). When no active term does, the objective runs
      the clean pass in fused mode (one backward pass gives the input gradient and the clean
      parameter gradient).
    - ``clean_weight``: w such that the penalty's parameter gradient contains w·∇θ mean CE(x)
      of the main head (−1/φ for DataGrad's finite difference, −1 for Lyu's one step). In fused
      mode (``ctx.fused``) the penalty detaches that part and the objective adds w·λ to the
      task weight, so a step whose total clean weight is 0 skips ∇θL(x) altogether.
    """

    needs_input_grad: ClassVar[bool] = False
    double_backward: ClassVar[bool | None] = None  # differentiates a gradient (None: = needs_input_grad)
    default_lam: ClassVar[float] = 1.0
    task_weight: ClassVar[float] = 1.0
    input_dependent: ClassVar[bool] = True
    uses_clean_graph: ClassVar[bool] = True  # conservative default
    clean_weight: ClassVar[float] = 0.0

    @property
    def uses_double_backward(self) -> bool:
        return self.needs_input_grad if self.double_backward is None else self.double_backward

    def setup(self, train_x: torch.Tensor) -> None:
        """Called once by the training loop before the first step with the whole training set
        ``(N, C, H, W)`` (e.g. for data-covariance standardization or to size per-example
        warm-start buffers). Must be deterministic: resume calls it again before loading state."""

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass | None = None) -> torch.Tensor:
        raise NotImplementedError

    def context(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass | None) -> CleanPass:
        """The shared clean pass, or a fresh one when called on its own."""
        if ctx is not None and (ctx.x_in.requires_grad or not self.needs_input_grad):
            return ctx
        # A penalty called on its own makes its own clean pass, in the model's mode but without
        # moving BatchNorm's running statistics: only the training loop's clean pass does that.
        with run_mode(model, "frozen" if model.training else "eval"):
            return CleanPass(model, x, y, need_input_grad=self.needs_input_grad)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "training")
