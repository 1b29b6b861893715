"""gradreg.autodiff: rerouted convolutions and ReLUs give standard autograd's derivatives."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradreg.autodiff import GradRequest, efficient_second_order


def _net(stride: int, padding: int, dilation: int, groups: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=stride, padding=padding, dilation=dilation, groups=groups), nn.ReLU(),
        nn.Conv2d(4, 4, 2, groups=groups), nn.Softplus(), nn.Flatten(), nn.LazyLinear(5),
    ).double()


def _gn_and_grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, rerouted: bool):
    """‖∇ₓ CE‖² (a GN penalty) and its parameter gradient, by double backprop."""
    xi = x.clone().requires_grad_(True)
    req = GradRequest(root=xi)
    if rerouted:
        with efficient_second_order(net, req):
            out = net(xi)
    else:
        out = net(xi)
    with req.inputs_only():
        (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), xi, create_graph=True)
    loss = F.cross_entropy(out, y) + g.pow(2).sum()
    req.params_only = True
    return g.detach(), torch.autograd.grad(loss, list(net.parameters()))


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (1, 1, 1, 1), (2, 1, 1, 1),
                                                             (1, 2, 2, 1), (2, 0, 1, 2)])
def test_first_and_second_derivatives_match_standard_autograd(stride: int, padding: int, dilation: int,
                                                             groups: int) -> None:
    net = _net(stride, padding, dilation, groups)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand((5, 2, 9, 9), generator=g, dtype=torch.float64), torch.randint(0, 5, (5,), generator=g)
    net(x)  # materialize the lazy layer
    g_std, grads_std = _gn_and_grads(net, x, y, rerouted=False)
    g_new, grads_new = _gn_and_grads(net, x, y, rerouted=True)
    torch.testing.assert_close(g_new, g_std, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_new, grads_std):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_third_derivatives_by_gradgradcheck() -> None:
    """A penalty's gradient is itself differentiable through the rerouted layers."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 2).double()
    x = torch.rand((2, 1, 4, 4), dtype=torch.float64)
    w = torch.randn((2, 1, 2, 2), dtype=torch.float64, requires_grad=True)

    def input_grad_norm(weight: torch.Tensor) -> torch.Tensor:
        xi = x.clone().requires_grad_(True)
        with efficient_second_order(conv, GradRequest(root=xi)):
            out = torch.tanh(conv._conv_forward(xi, weight, None)).pow(2).sum()  # the rerouted convolution
        (g,) = torch.autograd.grad(out, xi, create_graph=True)
        return g.pow(2).sum()

    assert torch.autograd.gradcheck(input_grad_norm, (w,))
    assert torch.autograd.gradgradcheck(input_grad_norm, (w,))


def test_modules_are_restored_even_on_error() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(RuntimeError, match="boom"), efficient_second_order(net, GradRequest()):
        assert "_conv_forward" in vars(net[0]) and "forward" in vars(net[1])
        raise RuntimeError("boom")
    assert "_conv_forward" not in vars(net[0]) and "forward" not in vars(net[1])


def test_params_only_skips_the_input_gradient_but_not_the_parameters() -> None:
    net = _net(1, 1, 1, 1)
    x, y = torch.rand((3, 2, 9, 9), dtype=torch.float64), torch.tensor([0, 1, 2])
    net(x)
    xi = x.clone().requires_grad_(True)
    req = GradRequest(root=xi)
    with efficient_second_order(net, req):
        loss = F.cross_entropy(net(xi), y)
    req.params_only = True
    loss.backward()
    assert xi.grad is None  # the first convolution's input gradient fed x.grad alone
    want = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.grad, w)


def test_a_step_leaves_no_graph_alive() -> None:
    """The rerouted layers' bookkeeping must not keep a step's graph (and its saved
    activations) alive after the step: a reference cycle through autograd nodes would."""
    import gc
    import weakref

    from gradreg.penalties.base import CleanPass

    net = _net(1, 1, 1, 1).float()
    x, y = torch.rand((4, 2, 9, 9)), torch.tensor([0, 1, 2, 3])
    net(x)
    ctx = CleanPass(net, x, y, need_input_grad=True, second_order=True)
    loss = ctx.losses()[0] + ctx.input_grad().pow(2).sum()
    ctx.finish()
    loss.backward()
    alive = weakref.ref(ctx.x_in)  # held by the graph for as long as the graph lives
    del ctx, loss
    gc.collect()
    assert alive() is None


def test_kernels_pass_their_self_check() -> None:
    from gradreg import autodiff

    autodiff.first_order_kernels_ok.cache_clear()
    assert autodiff.first_order_kernels_ok()


def test_wrong_kernels_warn_once_and_the_plain_path_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that computes a wrong derivative (as a changed PyTorch internal might) fails the
    self-check: one warning, and efficient_second_order then records standard nodes."""
    import warnings

    from gradreg import autodiff

    right = autodiff._backward_weight
    monkeypatch.setattr(autodiff, "_backward_weight", lambda *args: 1.5 * right(*args))
    autodiff.first_order_kernels_ok.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="kernels are off"):
            assert not autodiff.first_order_kernels_ok()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            assert not autodiff.first_order_kernels_ok()
        net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3)).double()
        x = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
        with autodiff.efficient_second_order(net, autodiff.GradRequest(root=x)):
            assert "_conv_forward" not in vars(net[0])  # not rerouted
            loss = F.cross_entropy(net(x), torch.tensor([0, 2]), reduction="sum")
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        got = torch.autograd.grad(g.pow(2).sum(), list(net.parameters()))
        x2 = x.detach().clone().requires_grad_(True)
        (g2,) = torch.autograd.grad(F.cross_entropy(net(x2), torch.tensor([0, 2]), reduction="sum"), x2,
                                    create_graph=True)
        want = torch.autograd.grad(g2.pow(2).sum(), list(net.parameters()))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        monkeypatch.undo()
        autodiff.first_order_kernels_ok.cache_clear()
