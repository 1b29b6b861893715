"""The threat model as a value: norm, radius ε and input bounds.

ε is always in the units of the model's input *before* normalization (normalization lives
inside the model). Nothing in gradreg hard-codes the [0, 1] box: every attack and penalty
takes its bounds from here.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction

import torch

NORMS = ("linf", "l2", "l1")
# sampler(torch.rand | torch.randn, shape) -> tensor of that shape; shape[0] is the batch size
Sampler = Callable[[Callable[..., torch.Tensor], tuple[int, ...]], torch.Tensor]
_ALIASES = {"inf": "linf", "linf": "linf", "Linf": "linf", "l_inf": "linf", "2": "l2", "l2": "l2",
            "L2": "l2", "1": "l1", "l1": "l1", "L1": "l1"}


def canonical_norm(norm: str) -> str:
    """Map user spellings (``inf``, ``2``, ``L2`` …) to ``linf``/``l2``/``l1``."""
    try:
        return _ALIASES[str(norm)]
    except KeyError:
        raise ValueError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}") from None


def dual_norm(norm: str) -> str:
    """p* with 1/p + 1/p* = 1: linf ↔ l1, l2 ↔ l2."""
    return {"linf": "l1", "l2": "l2", "l1": "linf"}[canonical_norm(norm)]


def parse_eps(text: str | float) -> float:
    """Parse ``0.1``, ``8/255`` or ``8 / 255`` into a float ≥ 0."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        try:
            value = float(Fraction(str(text).replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"cannot read ε {text!r}: write a number such as 0.1 or 8/255") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"ε must be a finite number ≥ 0, got {text!r}")
    return value


def check_eps_fits(eps: float, norm: str, bounds: tuple[float, float], dim: int) -> None:
    """Refuse a radius larger than the input box allows: beyond the box's diameter in that norm
    every input can already reach every other, so such an ε is a typo (``8`` for ``8/255``)."""
    width = float(bounds[1]) - float(bounds[0])
    norm = canonical_norm(norm)
    diameter = width if norm == "linf" else width * (math.sqrt(dim) if norm == "l2" else dim)
    if eps > diameter * (1 + 1e-6):
        raise ValueError(f"ε = {eps:g} is larger than the {norm} diameter of the input box {tuple(bounds)} "
                         f"({diameter:g}); did you mean {eps:g}/255?")


def same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``like`` (same shape): a perturbed input then runs through the
    model in the memory format of the clean one. For a 1-channel image batch both NCHW and
    channels-last strides describe the same bytes, and which one a tensor carries decides the
    layout the convolutions pick (on this project's 2-core CPU the channels-last one, which the
    data loaders' batches carry, was the faster for the C&W MNIST CNN)."""
    if t.stride() == like.stride() or t.shape != like.shape:
        return t
    return torch.empty_like(like).copy_(t)


def flat_norm(z: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of a batch ``(N, ...) -> (N,)``."""
    z = z.flatten(1)
    norm = canonical_norm(norm)
    if norm == "linf":
        return z.abs().amax(dim=1)
    if norm == "l2":
        return z.norm(p=2, dim=1)
    return z.abs().sum(dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``(N,)`` vector to broadcast against ``like`` ``(N, ...)``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class ThreatModel:
    """Perturbations δ with ‖δ‖_norm ≤ eps and lo ≤ x + δ ≤ hi.

    Example::

        threat = ThreatModel(norm="linf", eps=8 / 255, bounds=(0.0, 1.0))
        x_adv = threat.project(x, x + delta)
    """

    norm: str
    eps: float
    bounds: tuple[float, float]  # no default: the box comes from the data (its DataBundle / run)

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", canonical_norm(self.norm))
        object.__setattr__(self, "eps", parse_eps(self.eps))
        lo, hi = (float(b) for b in self.bounds)
        if not lo < hi:
            raise ValueError(f"bounds must satisfy lo < hi, got {self.bounds}")
        object.__setattr__(self, "bounds", (lo, hi))

    @property
    def lo(self) -> float:
        return self.bounds[0]

    @property
    def hi(self) -> float:
        return self.bounds[1]

    def with_eps(self, eps: float) -> ThreatModel:
        return replace(self, eps=eps)

    def distance(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Per-sample ‖x_adv − x‖ in this norm, shape ``(N,)``."""
        return flat_norm(x_adv - x, self.norm)

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.lo, self.hi)

    def project(self, x: torch.Tensor, x_adv: torch.Tensor, eps: float | torch.Tensor | None = None) -> torch.Tensor:
        """Project ``x_adv`` onto {‖δ‖ ≤ ε} ∩ box around ``x``.

        ``eps`` may be a per-sample ``(N,)`` tensor. For ℓ∞ the result is the exact Euclidean
        projection; for ℓ2/ℓ1 we scale onto the ball, then clip to the box (the usual
        approximation, as in foolbox and Madry et al.; clipping can only shrink the norm, so
        the result is always feasible).
        """
        eps_t = self.eps_tensor(x, eps)
        delta = x_adv - x
        if self.norm == "linf":
            e = _bcast(eps_t, delta)
            delta = torch.maximum(torch.minimum(delta, e), -e)
        elif self.norm == "l2":
            n = flat_norm(delta, "l2")
            factor = torch.where(n > eps_t, eps_t / n.clamp_min(1e-12), torch.ones_like(n))
            delta = delta * _bcast(factor, delta)
        else:
            delta = _project_l1(delta, eps_t)
        return same_layout(self.clip(x + delta), x)

    def normalize(self, g: torch.Tensor) -> torch.Tensor:
        """Steepest-ascent direction of unit norm for a gradient ``g``.

        linf: sign(g); l2: g/‖g‖₂; l1: all mass on the largest |gᵢ| (ties split evenly).
        A zero gradient gives a zero direction.
        """
        return steepest_direction(g, self.norm)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     eps: float | torch.Tensor | None = None, *, sampler: Sampler | None = None) -> torch.Tensor:
        """A uniform random point of the ε-ball around ``x``, clipped to the bounds.

        linf: uniform in the cube; l2: uniform in the ball; l1: uniform in the ball via the
        exponential-spacings trick. ``eps`` overrides ``self.eps`` (optionally per sample).
        Random numbers are drawn on the CPU so a seeded ``generator`` gives the same start on
        every device. ``sampler(fn, shape)`` replaces the draws (every shape starts with N);
        the training loop uses it to make draws independent of how a batch is split over ranks.
        """
        eps_t = self.eps_tensor(x, eps)
        n, d = x.shape[0], x[0].numel()

        def draw(fn: Callable[..., torch.Tensor], shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
            if sampler is not None:
                return sampler(fn, tuple(shape)).to(x.device, x.dtype)
            return fn(shape, generator=generator, device="cpu", dtype=x.dtype).to(x.device)

        if self.norm == "linf":
            delta = (2 * draw(torch.rand, x.shape) - 1) * _bcast(eps_t, x)
        elif self.norm == "l2":
            z = draw(torch.randn, x.shape)
            z = z / _bcast(flat_norm(z, "l2").clamp_min(1e-12), z)
            r = draw(torch.rand, (n,)) ** (1.0 / d)
            delta = z * _bcast(r * eps_t, z)
        else:
            e = -torch.log(draw(torch.rand, (n, d + 1)).clamp_min(1e-12))
            w = (e / e.sum(dim=1, keepdim=True))[:, :d]  # uniform on the simplex interior
            s = (draw(torch.rand, (n, d)) < 0.5).to(x.dtype) * 2 - 1  # random signs
            delta = (w * s * eps_t[:, None]).view_as(x)
        return self.clip(x + delta)

    def contains(self, x: torch.Tensor, x_adv: torch.Tensor, *, atol: float = 1e-5) -> torch.Tensor:
        """Per-sample boolean: inside the ε-ball (up to ``atol``, relative for l2/l1) and the bounds."""
        dist = self.distance(x, x_adv)
        tol = atol * max(1.0, self.eps) if self.norm == "linf" else atol * max(1.0, self.eps) * 10
        in_ball = dist <= self.eps + tol
        flat = x_adv.flatten(1)
        in_box = (flat >= self.lo - atol).all(dim=1) & (flat <= self.hi + atol).all(dim=1)
        return in_ball & in_box

    def eps_tensor(self, x: torch.Tensor, eps: float | torch.Tensor | None = None) -> torch.Tensor:
        """The radius per sample ``(N,)`` for a batch ``x``: ``eps`` (a number or a per-sample
        tensor) or, when None, this threat model's ε."""
        if eps is None:
            eps = self.eps
        if isinstance(eps, torch.Tensor):
            return eps.to(device=x.device, dtype=x.dtype).expand(x.shape[0])
        return torch.full((x.shape[0],), float(eps), device=x.device, dtype=x.dtype)

    # the name other modules used before it was public
    _eps_tensor = eps_tensor


def _project_l1(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the ℓ1 ball of radius eps (Duchi et al., 2008), batched."""
    flat = delta.flatten(1)
    abs_ = flat.abs()
    inside = abs_.sum(dim=1) <= eps
    mu, _ = abs_.sort(dim=1, descending=True)
    cums = mu.cumsum(dim=1)
    k = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    cond = mu - (cums - eps[:, None]) / k > 0
    # the last index where cond holds (cond is true on a prefix)
    rho = (cond * torch.arange(flat.shape[1], device=flat.device)).amax(dim=1, keepdim=True)
    theta = (cums.gather(1, rho) - eps[:, None]) / (rho + 1).to(flat.dtype)
    proj = flat.sign() * (abs_ - theta).clamp_min(0)
    out = torch.where(inside[:, None], flat, proj)
    return out.view_as(delta)


def steepest_direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit-``norm`` direction maximizing ⟨g, ·⟩ per sample (zero where g = 0): sign(g) for
    ℓ∞, g/‖g‖₂ for ℓ2, the largest entries for ℓ1. The one place gradreg computes it
    (:meth:`ThreatModel.normalize`)."""
    norm = canonical_norm(norm)
    if norm == "linf":
        return g.sign()
    if norm == "l2":
        n = flat_norm(g, "l2")
        return g / _bcast(n.clamp_min(1e-12), g)
    flat = g.flatten(1).abs()
    top = flat.amax(dim=1, keepdim=True)
    mask = (flat == top) & (top > 0)
    d = mask.to(g.dtype) * g.flatten(1).sign() / mask.sum(dim=1, keepdim=True).clamp_min(1)
    return d.view_as(g)
