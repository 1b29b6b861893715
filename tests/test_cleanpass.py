"""The clean pass offers results under the reuse rule, never the rule: a result comes back exactly
when a pass of the model under the asked BatchNorm policy would compute the same numbers (checked
here against such a pass), and None otherwise."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gradreg.cleanpass import RANKS, CleanPass
from gradreg.modes import BNPolicy, run_mode


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def plain_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(5, 1, 6, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)


def own_logits(model: nn.Module, x: torch.Tensor, policy: BNPolicy) -> torch.Tensor:
    with torch.no_grad(), run_mode(model, "frozen" if policy == "train" else policy):
        return model(x)


def test_batchnorm_model_gets_results_only_in_the_mode_of_the_pass() -> None:
    model, (x, y) = bn_net().train(), data()
    ctx = CleanPass(model, x, y, need_input_grad=True)
    assert ctx.logits_in(model, "eval") is None  # train-mode statistics ≠ running statistics
    assert ctx.detached_input_grad_in(model, "eval") is None
    assert ctx.graph_in(model, "eval") is None
    shared = ctx.logits_in(model, "train")
    assert shared is ctx.logits
    torch.testing.assert_close(shared.detach(), own_logits(model, x, "train"), rtol=1e-6, atol=1e-6)
    graph = ctx.graph_in(model, "frozen")  # batch statistics, like the train-mode pass
    assert graph is not None and graph.x_in is ctx.x_in and graph.logits is ctx.logits


def test_mode_invariant_model_shares_with_every_policy() -> None:
    model, (x, y) = plain_net().train(), data()
    ctx = CleanPass(model, x, y, need_input_grad=True)
    shared = ctx.logits_in(model, "eval")
    assert shared is not None
    torch.testing.assert_close(shared.detach(), own_logits(model, x, "eval"), rtol=0, atol=0)
    g = ctx.detached_input_grad_in(model, "eval")
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    assert g is not None
    torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-7)


def test_no_results_without_the_input_gradient_or_on_the_plain_path() -> None:
    model, (x, y) = plain_net(), data()
    no_grad = CleanPass(model, x, y, need_input_grad=False)
    assert no_grad.logits_in(model, "eval") is not None
    assert no_grad.detached_input_grad_in(model, "eval") is None and no_grad.graph_in(model, "eval") is None
    plain = CleanPass(model, x, y, need_input_grad=True, fast=False)  # --no-fast-paths: every penalty its own pass
    assert plain.logits_in(model, "train") is None and plain.graph_in(model, "train") is None


def test_ranks_are_identities_in_one_process() -> None:
    a, b = torch.randn(3), torch.randn(2, 2)
    out = RANKS.average([a, b], 7)
    assert out[0] is a and out[1] is b
    idx, rows = RANKS.gather_rows(torch.tensor([4, 1]), b)
    assert torch.equal(idx, torch.tensor([4, 1])) and torch.equal(rows, b)
