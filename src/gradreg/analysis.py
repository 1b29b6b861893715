"""Perturbation analysis (SGR paper, SPEC §3): the covariance function of a model's PGD
perturbations and its decay length next to the data's, and the softmax along the straight
line from a clean input to its adversarial example (a smoothness picture)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .data import DataBundle
from .modes import run_mode
from .penalties.sgr import covfun_second_moment
from .protocols import EvalSettings, craft, test_subset
from .report import markdown_table
from .threat import ThreatModel


def decay_length(values: torch.Tensor | list[float]) -> float | None:
    """Displacement (pixels) where a covariance function first falls to 1/e of its value at 0,
    by linear interpolation between neighbouring integer displacements; None if it never does."""
    v = [float(a) for a in values]
    if not v or v[0] <= 0:
        return None
    target = v[0] / math.e
    for r in range(1, len(v)):
        if v[r] <= target:
            return (r - 1) + (v[r - 1] - target) / (v[r - 1] - v[r])
    return None


@dataclass
class CovarianceAnalysis:
    eps: float
    perturbation: list[float]  # within-channel covariance function of ξ = x_adv − x, by displacement
    data: list[float]  # within-channel covariance function of the centred test inputs
    perturbation_decay: float | None
    data_decay: float | None


def perturbation_covariance(model: nn.Module, bundle: DataBundle, settings: EvalSettings, *,
                            eps: float) -> tuple[CovarianceAnalysis, torch.Tensor, torch.Tensor]:
    """PGD perturbations of the test set at radius ``eps`` and their covariance function.
    Returns the analysis and the (clean, adversarial) inputs for further plots."""
    x, y = test_subset(bundle, settings.n_test)
    threat = ThreatModel(settings.norm, 0.0, bundle.bounds)
    x_adv = craft(model, x, y, settings.make_attack("pgd"), threat, [eps], batch_size=settings.batch_size)[0]
    xi = (x_adv - x).double()  # (N, C, H, W)
    intra_xi, _ = covfun_second_moment(xi)
    centred = (x - x.mean(dim=0, keepdim=True)).double()
    intra_x, _ = covfun_second_moment(centred)
    analysis = CovarianceAnalysis(eps=eps, perturbation=intra_xi.tolist(), data=intra_x.tolist(),
                                  perturbation_decay=decay_length(intra_xi), data_decay=decay_length(intra_x))
    return analysis, x, x_adv


@torch.no_grad()
def softmax_along_line(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, *, points: int = 41) -> torch.Tensor:
    """p(x + t·(x_adv − x)) for t in [0, 1]: ``(points, N, K)``, model in eval mode."""
    dev = next(model.parameters()).device
    ts = torch.linspace(0, 1, points)
    with run_mode(model, "eval"):
        return torch.stack([torch.softmax(model((x + t * (x_adv - x)).to(dev)), dim=1).cpu() for t in ts])


# ----- what each method regularizes: per-example gradient and operator norms ---------------------
@dataclass
class NormStats:
    """Median and quartiles of one quantity over a set of examples."""

    quantity: str
    median: float
    q1: float
    q3: float
    n: int


def input_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, opnorm_p: str = "l2",
                         opnorm_q: str = "l2", iterations: int = 20, batch_size: int = 256,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """Per example, with the model in eval mode: ‖∇ₓL‖₁, ‖∇ₓL‖₂ (L the cross-entropy at the
    label y) and the data-dependent operator norm ‖J(x)‖_{p,q} = max_{‖v‖ₚ=1} ‖J(x)v‖_q of the
    logits' Jacobian (Roth, Kilcher, Hofmann, NeurIPS 2020), estimated by ``iterations`` steps
    of the cold-started power method (:func:`gradreg.jacobian.power_method`). For
    p = q = 2 that converges to the largest singular value; otherwise it ends at a local
    maximum, a lower bound of the norm.

    The quantities the family penalizes: DataGrad-ℓ1/Lyu-ℓ∞ the ℓ1 norm of ∇ₓL, DataGrad-ℓ2/GN
    its ℓ2 norm, the operator-norm penalty ‖J‖_{p,q}. Returns ``{"grad_l1", "grad_l2",
    "opnorm_<p>_<q>"}``, each ``(N,)`` on the CPU, computed in batches of ``batch_size``.
    """
    from torch.nn import functional as F

    from .jacobian import power_method

    dev = next(model.parameters()).device
    torch.manual_seed(seed)  # the power method's random start (our choice: one seed per call)
    out: dict[str, list[torch.Tensor]] = {"grad_l1": [], "grad_l2": [], f"opnorm_{opnorm_p}_{opnorm_q}": []}
    with run_mode(model, "eval"):
        for i in range(0, len(y), batch_size):
            xb = x[i:i + batch_size].to(dev).detach().requires_grad_(True)
            yb = y[i:i + batch_size].to(dev)
            with torch.enable_grad():
                # samples do not interact in eval mode: the summed loss gives each one's own gradient
                (g,) = torch.autograd.grad(F.cross_entropy(model(xb), yb, reduction="sum"), xb)
            g = g.flatten(1)  # (B, d)
            out["grad_l1"].append(g.abs().sum(dim=1).cpu())
            out["grad_l2"].append(g.norm(dim=1).cpu())
            res = power_method(model, xb.detach(), norm=opnorm_p, out_norm=opnorm_q, iterations=iterations)
            out[f"opnorm_{opnorm_p}_{opnorm_q}"].append(res.sigma.detach().cpu())
    return {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}


def norm_stats(values: dict[str, torch.Tensor]) -> list[NormStats]:
    """Median and quartiles (linear interpolation, as numpy's default) of every quantity."""
    rows = []
    for name, v in values.items():
        q = torch.quantile(v.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist() if len(v) else [math.nan] * 3
        rows.append(NormStats(quantity=name, median=q[1], q1=q[0], q3=q[2], n=len(v)))
    return rows


def norms_markdown(per_method: dict[str, dict[str, torch.Tensor]]) -> str:
    """One row per (method, quantity): median [q1, q3]."""
    rows = [[method, s.quantity, f"{s.median:.4g}", f"{s.q1:.4g}", f"{s.q3:.4g}", str(s.n)]
            for method, values in per_method.items() for s in norm_stats(values)]
    return markdown_table(["method", "quantity", "median", "q1", "q3", "n"], rows) + "\n"


def plot_norm_distributions(per_method: dict[str, dict[str, torch.Tensor]], path: str, *, title: str = "") -> None:
    """One panel per quantity, a box per method (log scale; whiskers at 1.5 IQR, our choice)."""
    from .report import _pyplot

    plt = _pyplot()
    quantities = list(next(iter(per_method.values())))
    fig, axes = plt.subplots(1, len(quantities), figsize=(3.6 * len(quantities), 3.6), dpi=120, squeeze=False)
    methods = list(per_method)
    for ax, q in zip(axes[0], quantities):
        # a norm of 0 has no place on a log axis: floor at the smallest positive value (our choice)
        data = []
        for m in methods:
            v = per_method[m][q].double()
            pos = v[v > 0]
            data.append(v.clamp_min(float(pos.min()) if len(pos) else 1e-12).tolist())
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=45, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(q.replace("_", " "), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
