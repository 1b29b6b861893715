"""Convolutions whose double backward uses first-order kernels (our engineering, no paper's).

Double backprop (GN, DataGrad and Lyu exact, SGR, the operator-norm power method)
differentiates the input gradient g = ∇ₓL, whose graph holds one "backward-data" convolution
per layer. PyTorch differentiates those through ``_convolution_double_backward``, which
computes the weight part as a convolution with the batch as channels and the feature map
as kernel, after transposing copies: in a CPU profile of the C&W MNIST CNN it was the
largest extra cost of a GN step (step costs before and after: BENCHMARKS.md).

Inside :func:`efficient_second_order` every plain ``nn.Conv2d`` of the model runs through
:class:`_Conv2d`, whose input gradient is :class:`_ConvInputGrad`: its forward is the same
backward-data kernel, and its own backward uses a forward convolution (for the cotangent)
and the backward-weight kernel (for the weight): the kernels of a clean training step.
Values are those of standard autograd up to float rounding (tested for first and second
derivatives, and third through ``gradgradcheck``).

A :class:`GradRequest` shared by the layers of one forward pass lets the caller say what the
next backward pass needs, which autograd cannot tell a Python function:

- ``input_only``: an input-gradient pass (``autograd.grad`` w.r.t. x or a cotangent): skip
  weight and bias gradients;
- ``params_only``: the final parameter-gradient pass of a training step: skip the input
  gradient of a convolution whose input depends on no parameter (the first layer), which
  only ``x.grad`` would receive.

Plain ``nn.ReLU`` modules run through :class:`_ReLU`, whose double backward skips an all-zero
term. Convolutions with string padding, another ``padding_mode`` or unbatched input keep the
standard path, as do all other layers and every layer under autocast.

The kernels call ``torch.ops.aten.convolution_backward``, a PyTorch internal whose contract
may change between releases (gradreg declares the torch range it is tested with). So on first
use in a process they check themselves against standard autograd on a tiny convolutional
network (first and second derivatives, float64); if they disagree, gradreg warns once and
:func:`efficient_second_order` takes the plain path from then on. :func:`disabled` turns them
off for a block (the training step's ``fast_paths=False``).
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .threat import same_layout

_aten = torch.ops.aten


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


@dataclass
class GradRequest:
    """What the next backward pass through the patched layers must produce (see module doc)."""

    root: torch.Tensor | None = None  # the input leaf; gradients flowing only to it are input gradients
    input_only: bool = False
    params_only: bool = False
    _memo: dict[Any, bool] = field(default_factory=dict, repr=False)

    @contextmanager
    def inputs_only(self) -> Iterator[None]:
        """Mark a backward pass that differentiates w.r.t. inputs only (no parameter gradients)."""
        before = self.input_only
        self.input_only = True
        try:
            yield
        finally:
            self.input_only = before

    def depends_on_params(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s autograd history reaches a leaf other than ``root`` (a parameter).
        Memoized per graph node, so the walk over a whole network is linear in its size."""
        if t.grad_fn is None:
            return t.requires_grad and t is not self.root
        stack, order = [t.grad_fn], []
        while stack:  # iterative DFS, then resolve in reverse post-order
            node = stack.pop()
            if node in self._memo:
                continue
            self._memo[node] = False  # provisional, also breaks (impossible) cycles
            order.append(node)
            for nxt, _ in node.next_functions:
                if nxt is not None and nxt not in self._memo:
                    stack.append(nxt)
        for node in reversed(order):
            var = getattr(node, "variable", None)  # AccumulateGrad: a leaf
            if var is not None:
                self._memo[node] = var is not self.root
            else:
                self._memo[node] = any(self._memo.get(nxt, False) for nxt, _ in node.next_functions if nxt is not None)
        return self._memo[t.grad_fn]


def _backward_data(grad_out: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    # the kernel reads only x's shape and layout; a stride-0 stub would be copied to a dense one
    return _aten.convolution_backward(grad_out, x, weight, None, list(g.stride), list(g.padding),
                                      list(g.dilation), False, [0] * len(g.stride), g.groups,
                                      [True, False, False])[0]


def _backward_weight(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    return _aten.convolution_backward(grad_out, x, weight, None, list(g.stride), list(g.padding),
                                      list(g.dilation), False, [0] * len(g.stride), g.groups,
                                      [False, True, False])[1]


class _ConvInputGrad(torch.autograd.Function):
    """gx = convᵀ(grad_out, W), differentiable in grad_out and W with first-order kernels."""

    @staticmethod
    def forward(grad_out: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, geom: ConvGeometry,
                req: GradRequest) -> torch.Tensor:
        return _backward_data(grad_out, weight, x, geom)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        grad_out, weight, x, geom, req = inputs
        ctx.save_for_backward(grad_out, weight, x)
        ctx.geom, ctx.req = geom, req

    @staticmethod
    def backward(ctx: Any, ggx: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_out, weight, x = ctx.saved_tensors
        g: ConvGeometry = ctx.geom
        g_out = g_w = None
        # a penalty's cotangent (e.g. from an FFT) may come in another memory format than the
        # layer's input; the kernels below would then convert their large outputs instead
        ggx = same_layout(ggx, x)
        if ctx.needs_input_grad[0]:  # ⟨ggx, convᵀ(go, W)⟩ = ⟨conv(ggx, W), go⟩
            g_out = F.conv2d(ggx, weight, None, g.stride, g.padding, g.dilation, g.groups)
        if ctx.needs_input_grad[1] and not ctx.req.input_only:  # the weight gradient of conv(ggx, W) at go
            g_w = _backward_weight(grad_out, ggx, weight, g)
        return g_out, g_w, None, None, None


class _Conv2d(torch.autograd.Function):
    """F.conv2d whose input gradient is a :class:`_ConvInputGrad` (efficiently differentiable)."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry,
                req: GradRequest) -> torch.Tensor:
        return F.conv2d(x, weight, bias, geom.stride, geom.padding, geom.dilation, geom.groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, weight, bias, geom, req = inputs
        ctx.save_for_backward(x, weight)
        ctx.geom, ctx.req, ctx.has_bias = geom, req, bias is not None
        ctx.input_feeds_params = req.depends_on_params(x) if x.requires_grad else False

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        req: GradRequest = ctx.req
        g: ConvGeometry = ctx.geom
        gx = gw = gb = None
        if ctx.needs_input_grad[0] and not (req.params_only and not ctx.input_feeds_params):
            gx = _ConvInputGrad.apply(grad_out, weight, x.detach(), g, req)
        if not req.input_only:
            if ctx.needs_input_grad[1]:
                gw = _backward_weight(grad_out, x, weight, g)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = grad_out.sum(dim=(0, 2, 3))
        return gx, gw, gb, None, None


class _ReLU(torch.autograd.Function):
    """max(x, 0) whose backward reads a detached copy of the output: the double backward then
    masks the cotangent and no longer builds (and adds) an all-zero gradient w.r.t. x, whose
    true value is zero almost everywhere anyway."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return _aten.threshold_backward(grad_out, out.detach(), 0)


def _relu_forward(x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad and not torch.is_autocast_enabled(x.device.type):
        return _ReLU.apply(x)
    return F.relu(x)


def _patchable_conv(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            and "_conv_forward" not in vars(m))


def _patchable_relu(m: nn.Module) -> bool:
    return type(m) is nn.ReLU and not m.inplace and "forward" not in vars(m)


_ENABLED: ContextVar[bool] = ContextVar("gradreg_first_order_kernels", default=True)


@contextmanager
def disabled() -> Iterator[None]:
    """Within the block :func:`efficient_second_order` records standard autograd nodes."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _self_check_model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return net


def _input_grad_penalty(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                        patched: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(∇ₓL, ∇θ‖∇ₓL‖²): the first and second derivatives the kernels must reproduce."""
    x_in = x.clone().requires_grad_(True)
    req = GradRequest(root=x_in)
    ctx = _patched(net, req) if patched else _nothing(req)
    with ctx:
        loss = F.cross_entropy(net(x_in), y, reduction="sum")
    with req.inputs_only():
        (g,) = torch.autograd.grad(loss, x_in, create_graph=True)
    grads = torch.autograd.grad(g.pow(2).sum() + loss, list(net.parameters()))
    req._memo.clear()
    return g.detach(), tuple(t.detach() for t in grads)


@functools.cache
def first_order_kernels_ok() -> bool:
    """Whether the kernels give standard autograd's derivatives in this process (checked once on
    a tiny float64 network; on disagreement a warning, once, and the plain path from then on)."""
    net = _self_check_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((3, 2, 4, 4), generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    try:
        g_ref, h_ref = _input_grad_penalty(net, x, y, patched=False)
        g, h = _input_grad_penalty(net, x, y, patched=True)
        ok = torch.allclose(g, g_ref, rtol=1e-7, atol=1e-10) and all(
            torch.allclose(a, b, rtol=1e-7, atol=1e-10) for a, b in zip(h, h_ref))
        reason = "their derivatives differ from standard autograd's"
    except RuntimeError as err:  # an internal kernel whose signature changed
        ok, reason = False, f"they fail ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if not ok:
        warnings.warn(f"gradreg.autodiff: the first-order double-backward kernels are off in this process: "
                      f"{reason} under torch {torch.__version__}; training takes the standard (slower) path",
                      RuntimeWarning, stacklevel=2)
    return ok


@contextmanager
def _nothing(req: GradRequest) -> Iterator[GradRequest]:
    yield req


@contextmanager
def efficient_second_order(model: nn.Module, req: GradRequest) -> Iterator[GradRequest]:
    """Within the block, forward passes of ``model`` record :class:`_Conv2d` nodes for its plain
    ``nn.Conv2d`` layers (unbatched inputs fall back to ``F.conv2d``). The nodes keep ``req``,
    through which the caller marks later backward passes (see the module doc). A no-op inside
    :func:`disabled` or when the kernels failed their self-check."""
    if not _ENABLED.get() or not first_order_kernels_ok():
        with _nothing(req):
            yield req
        return
    with _patched(model, req):
        yield req


@contextmanager
def _patched(model: nn.Module, req: GradRequest) -> Iterator[GradRequest]:
    relus = [m for m in model.modules() if _patchable_relu(m)]
    for m in relus:
        # an instance attribute shadows the method (setattr: a type checker forbids assigning methods)
        setattr(m, "forward", _relu_forward)
    patched = [m for m in model.modules() if isinstance(m, nn.Conv2d) and _patchable_conv(m)]
    for m in patched:
        assert not isinstance(m.padding, str)  # string padding keeps the standard path (_patchable_conv)
        geom = ConvGeometry(tuple(m.stride), tuple(m.padding), tuple(m.dilation), m.groups)

        def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 geom: ConvGeometry = geom) -> torch.Tensor:
            if x.dim() != 4 or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
                # autocast casts inside the forward only: the standard node keeps the cast weight
                return F.conv2d(x, weight, bias, geom.stride, geom.padding, geom.dilation, geom.groups)
            return _Conv2d.apply(x, weight, bias, geom, req)

        setattr(m, "_conv_forward", conv)  # an instance attribute shadows the method, as for the ReLUs
    try:
        yield req
    finally:
        # the memo holds graph nodes, and the nodes hold ``req``: a reference cycle through C++
        # objects that Python's collector cannot break, which kept every step's graph alive
        req._memo.clear()
        for m in patched:
            del m._conv_forward
        for m in relus:
            del m.forward
