"""DataGrad: a norm of the input gradient of the loss, and its multi-task form (SPEC §1).

Ororbia, Kifer, Giles, "Unifying Adversarial Training Algorithms with Flexible Deep Data
Gradient Regularization", Neural Computation 2017 (arXiv 1601.07213):

    J(θ) = λ₀·L₀(x, y) + Σ_t λ_t · R( ∇ₓ L_t(x, y) ),    R(g) = ‖g‖₁ (DGL1) or ‖g‖₂ (DGL2)

Per sample, g_i = ∇_{x_i} Σ_j L(x_j, y_j) (row i of the gradient of the *summed* loss, i.e.
sample i's own gradient) and the penalty is the batch mean, mean_i R(g_i).

Two solvers:

- ``solver="exact"``: double backprop through g (``CleanPass.input_grad`` keeps the graph).
- ``solver="fd"``: the paper's finite-difference view. With d = ∇_g R(g) detached
  (sign(g) for ℓ1, g/‖g‖₂ for ℓ2, g for ½‖g‖₂²) and step φ (``fd_step``),

      ∇_θ R(g) = (∂g/∂θ)ᵀ d ≈ [∇_θ L(x + φ·d) − ∇_θ L(x)] / φ .

  We return the surrogate ``R(g) + s − stop_grad(s)`` with s = [L(x + φd) − L(x)]/φ, where x
  and d are detached and L(x) is the shared clean pass: its *value* is the exact R(g) (so logs
  are comparable between solvers) and its *parameter gradient* is the finite difference.
  With λ/φ = 1 − α and ℓ1 this is Goodfellow's FGSM mix α·L(x) + (1−α)·L(x + φ·sign g).
  The perturbed pass runs in the mode of the clean pass without updating BatchNorm running
  statistics (:func:`gradreg.modes.frozen_stats`), so the difference compares one function at
  two inputs; a model with dropout draws other masks in the two passes (the difference is then
  noisy — avoid dropout with ``fd``). The −L(x)/φ part is declared as the penalty's
  ``Requirements.clean_coeff`` (the step adds it, or fuses it with the task loss's).

Multi-task (MT-DG): for a model with auxiliary heads and targets ``(N, T)``, one term per
task, each on the gradient of that task's own loss, weighted by ``task_lams``.

Warning — our choices, not the paper's:
  * ``squared=True`` gives ½‖g‖₂² (the paper's exact ℓ2 form is unknown; SPEC §1).
  * ``task_lams`` defaults to 1 for every task; the global λ of the objective multiplies
    the whole sum Σ_t λ_t·R_t.
  * The number of tasks is min(#heads, #target columns): a multi-head model trained on
    main labels only gets the main-task term alone.
  * ``default_lam`` 0.05 for ℓ1 and 1.0 for ℓ2 and ½‖g‖₂² (ℓ2 radii are ~√d larger). Not tuned.
  * ``fd_step`` φ defaults to 2·``default_lam`` (0.1 for ℓ1, 2.0 for ℓ2 and ½‖g‖₂², in input
    units along d): at the default λ the finite-difference objective is then
    (1 − λ/φ)·L(x) + (λ/φ)·L(x + φd) = ½·L(x) + ½·L(x + φd), Goodfellow's FGSM mix with α = ½ and,
    for ℓ1, an ℓ∞ step of 0.1. (A φ much smaller than λ would weight the clean gradient by
    1 − λ/φ < 0: with λ = 0.05 and φ = 0.01 by −4, pushing the clean loss *up*.)
  * Such a λ is refused: :meth:`DataGrad.check_lam` (called by :class:`gradreg.objective.Objective`)
    raises a one-line ``ConfigError`` when the clean weight w₀ − λ·λ₀/φ is negative, unless the
    penalty is built with ``allow_negative_clean=True`` (our choice; the paper does not discuss it).

Example::

    pen = make("datagrad", p=1, solver="fd", fd_step=0.1)
    loss = F.cross_entropy(model(x), y) + 0.05 * pen(model, x, y)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError
from ..models.base import forward_all
from ..modes import frozen_stats
from ..threat import same_layout
from . import PENALTIES
from .base import CleanPass, Penalty, Requirements, Term, split_targets
from .norms import _TINY, grad_norm, safe_l2


def num_tasks(ctx: CleanPass) -> int:
    """Tasks that have both a head and a target column."""
    return min(len(ctx.outputs), len(split_targets(ctx.y)))


@PENALTIES.register("datagrad")
class DataGrad(Penalty):
    """DataGrad (Ororbia et al. 2017): ‖∇ₓL‖₁ or ‖∇ₓL‖₂ per task; exact or finite-difference solver.

    Σ_t λ_t · mean_i R(∇ₓ L_t(x_i, y_i)), R = ‖·‖₁, ‖·‖₂ or ½‖·‖₂²."""

    default_lam = 0.05

    def __init__(self, *, p: int = 1, squared: bool = False, solver: str = "exact", fd_step: float | None = None,
                 task_lams: Sequence[float] | None = None, allow_negative_clean: bool = False) -> None:
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"datagrad p must be 1 or 2, got {p!r}")
        if squared and p != 2:
            raise ValueError("datagrad squared=True needs p=2 (½‖g‖₂²)")
        if solver not in ("exact", "fd"):
            raise ValueError(f"datagrad solver must be 'exact' or 'fd', got {solver!r}")
        self.default_lam = 0.05 if p == 1 else 1.0  # depends on the norm (see module doc)
        fd_step = 2 * self.default_lam if fd_step is None else fd_step
        if not fd_step > 0:
            raise ValueError(f"datagrad fd_step must be > 0, got {fd_step!r}")
        self.p = p
        self.squared = bool(squared)
        self.solver = solver
        self.fd_step = float(fd_step)
        self.task_lams = None if task_lams is None else tuple(float(v) for v in task_lams)
        self.allow_negative_clean = bool(allow_negative_clean)
        self._rnorm = "sq" if self.squared else f"l{p}"
        # exact: double backprop through the clean pass; fd: a detached gradient and two passes
        # whose clean half, −(λ₀/φ)·L(x), is the penalty's clean_coeff
        main_lam = 1.0 if self.task_lams is None else self.task_lams[0]
        exact = solver == "exact"
        self.requires = Requirements(input_grad=True, double_backward=exact, clean_graph=exact,
                                     clean_coeff=0.0 if exact else -main_lam / self.fd_step)

    def check_lam(self, lam: float, *, task_weight: float = 1.0) -> None:
        """Refuse a global λ whose finite-difference objective weighs the clean loss negatively:
        w₀·L(x) − (λ·λ₀/φ)·L(x) + (λ·λ₀/φ)·L(x + φd) has clean weight w₀ − λ·λ₀/φ (λ₀ the main
        task's ``task_lams`` entry). The exact solver has no such weight and is never refused."""
        if self.solver != "fd" or self.allow_negative_clean:
            return
        clean_weight = task_weight + lam * self.requires.clean_coeff  # clean_coeff = −λ₀/φ
        if clean_weight < -1e-12:
            raise ConfigError(f"datagrad solver='fd': λ = {lam:g} with φ = fd_step = {self.fd_step:g} weighs the "
                              f"clean loss by {clean_weight:g} < 0; use λ ≤ φ, a larger fd_step, or "
                              f"allow_negative_clean=true")

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """d = ∇_g R(g), per sample, detached: sign(g), g/‖g‖₂ (0 at g = 0) or g."""
        g = g.detach()
        if self._rnorm == "l1":
            return g.sign()
        if self._rnorm == "l2":
            n = safe_l2(g).view(-1, *([1] * (g.dim() - 1)))
            return torch.where(n > 0, g / n.clamp_min(_TINY), torch.zeros_like(g))
        return g

    def _lams(self, tasks: int) -> tuple[float, ...]:
        if self.task_lams is None:
            return (1.0,) * tasks
        if len(self.task_lams) != tasks:
            raise ValueError(f"datagrad task_lams has {len(self.task_lams)} entries but the batch has {tasks} tasks")
        return self.task_lams

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        total = x.new_zeros(())
        for t, lam_t in enumerate(self._lams(num_tasks(ctx))):
            if lam_t == 0:
                continue
            total = total + lam_t * (self._exact(ctx, t) if self.solver == "exact" else self._fd(model, ctx, t))
        return Term(total)

    def _exact(self, ctx: CleanPass, t: int) -> torch.Tensor:
        g = ctx.input_grad(t)  # (N, C, H, W), differentiable in θ
        return grad_norm(g, self._rnorm).mean()

    def _fd(self, model: nn.Module, ctx: CleanPass, t: int) -> torch.Tensor:
        """R(g) in value; in gradient L_t(x + φd)/φ, and −L_t(x)/φ for an auxiliary task (the main
        task's −L(x)/φ is the penalty's clean_coeff)."""
        g = ctx.detached_input_grad(t)  # (N, C, H, W)
        value = grad_norm(g, self._rnorm).mean()  # exact R(g), no graph
        d = self.direction(g)
        target = split_targets(ctx.y)[t]
        x0 = ctx.x.detach()
        with frozen_stats(model):
            out_fd = forward_all(model, same_layout(x0 + self.fd_step * d, x0))[t]
        s = F.cross_entropy(out_fd, target)
        if t > 0:
            s = s - F.cross_entropy(ctx.outputs[t], target)
        s = s / self.fd_step
        return value + (s - s.detach())
