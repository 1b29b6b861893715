"""Data-dependent operator-norm regularization and its baselines (SPEC §5).

Roth, Kilcher, Hofmann, "Adversarial Training is a Form of Data-dependent Operator Norm
Regularization", NeurIPS 2020 (arXiv 1906.01527). For a ReLU network f(x + Δ) ≈ f(x) + J(x)Δ
around each x, and ℓp-constrained PGD adversarial training with an ℓq loss on the logits of
clean and perturbed inputs regularizes (small ε, step → ∞) the data-dependent operator norm

    ‖J(x)‖_{p,q} = max_{‖v‖ₚ = 1} ‖J(x)v‖_q .

``opnorm`` estimates the maximizer v per sample by the power method, with the ReLU pattern
fixed at x and the model in eval mode (``bn_policy``)::

    v_k = ψ_{p*}( Jᵀ ψ_q( J v_{k−1} ) ),   ψ_r(z) = sign(z)⊙|z|^{r−1} / ‖z‖_r^{r−1}

(p = q = 2: u ← Jv/‖Jv‖, v ← Jᵀu/‖Jᵀu‖; p = ∞: v = sign(·)). ψ_{p*} is the steepest-ascent
direction of the ℓp ball and ψ_q that of the ℓ_{q*} ball, i.e. ``ThreatModel.normalize``; so
p, q ∈ {l1, l2, linf} all come for free (ψ_∞ puts the unit mass on the largest entry).
The power method and the Jacobian products live in :mod:`gradreg.jacobian` (the norm analysis
uses them too); ``power_method`` and ``PowerResult`` are re-exported here. v is detached.
The penalty, λ outside:

- ``form="sos"`` (default, the experiments' numerically stable form): ½·‖f(x + εv) − f(x)‖_q²
- ``form="uJv"``: ½·(uᵀJ(x)v)² with u = ψ_q(Jv), both detached (≈ ½σ², σ the operator norm).

Warm start (``warm_start=True``, our addition for cost): the penalty keeps one *output-space*
vector u per training example, ``u_buf`` ``(N_train, K)``, drawn from a seeded generator at the
first step (K is the model's number of logits); each step continues the example's iteration
from its last u (looked up by ``ctx.index``): v = ψ_{p*}(Jᵀu), then ``iterations − 1`` more
iterations (default 1 in all), then u = ψ_q(Jv) is written back. Keeping u rather than v saves
a pass: the one ``create_graph`` backward that the Jv products need is taken at the cotangent
u, so its value is Jᵀu for free; and the state is K numbers per example instead of d. The
buffer is in ``state_dict``, allocated by ``setup(model, train_x)`` (which must run before
``load_state_dict``: the loop's contract).

``snr``: the global baseline of Yoshida & Miyato, "Spectral Norm Regularization for Improving
the Generalizability of Deep Learning", 2017: (λ/2)·Σ_l σ(W_l)² over every ``Linear`` and
convolution weight (kernels reshaped to out × in·k·k), one power iteration per layer per
step with a persistent u per layer.

``opnorm-at``: the adversarial-training counterpart L(x) + λ·max_{x*∈B_ε} ½‖f(x) − f(x*)‖₂²,
ℓ2 PGD with x₀ uniform in the ball. With a large step (``rel_stepsize`` → ∞) its iteration
*is* the (2, 2) power method on the linearization, which is what the equivalence rests on;
our default step is ε (``rel_stepsize=1``), already close to that regime.

.. warning::
   Our choices: x + εv is not clipped to the input bounds (it probes the linearization, not
   an image); ε = 0 returns an exact 0; the clean branch f(x) is the loop's shared clean pass
   (train mode), the perturbed pass runs under ``perturbed_bn_policy="frozen"`` (batch
   statistics, running statistics restored). In train mode BatchNorm couples the samples of
   a batch, so the Jacobian of the ``uJv`` form then includes that coupling; the power method
   itself runs in eval mode and is exactly per sample. Default λ, ε and step sizes are ours.

Example::

    pen = make("opnorm", norm="l2", eps=0.5)                   # 10 power iterations per step
    pen = make("opnorm", warm_start=True); pen.setup(model, train_x)  # 1 iteration, warm u per example
"""
from __future__ import annotations

import torch
from torch import nn

from ..attacks.pgd_core import pgd
from ..cleanpass import RANKS, Graph, Ranks
from ..jacobian import PowerResult, power_method
from ..models.base import unwrap
from ..modes import BNPolicy, check_policy, perturbed_policy, run_mode
from ..threat import ThreatModel, canonical_norm, dual_norm, flat_norm, same_layout
from ..threat import steepest_direction as steepest  # ψ_{norm*}: the unit-norm maximizer of ⟨z, ·⟩
from . import PENALTIES
from .base import CleanPass, Penalty, Requirements, Term
from .inner import clean_logits, resolve_eps

__all__ = ["OperatorNorm", "OperatorNormAT", "PowerResult", "SpectralNorm", "power_method", "spectral_layers"]

FORMS = ("sos", "uJv")


@PENALTIES.register("opnorm")
class OperatorNorm(Penalty):
    """Data-dependent (p, q) operator norm of the input-output Jacobian (Roth et al. 2020).

    ½‖f(x + εv) − f(x)‖_q² (``sos``) or ½(uᵀJv)² (``uJv``), v from the power method.
    p = ``norm`` (input), q = ``out_norm`` (logits); ``iterations`` defaults to 10, or 1 with
    ``warm_start``; ε defaults to 0.5 (ℓ2) or 8/255 (ℓ∞) times the width of the data's box, our choice."""

    # Jv by the double-backward trick; the clean pass keeps its input in the graph so the power
    # method can run on it when the model is mode-invariant: one forward pass less per step
    requires = Requirements(input_grad=True, double_backward=True)
    default_lam = 1.0  # our choice

    def __init__(self, *, norm: str = "l2", out_norm: str = "l2", eps: float | str | None = None,
                 form: str = "sos", iterations: int | None = None, warm_start: bool = False, seed: int = 0,
                 bn_policy: BNPolicy = "eval", perturbed_bn_policy: BNPolicy = "frozen") -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown opnorm form {form!r}; use one of {FORMS}")
        self.norm = canonical_norm(norm)
        self.out_norm = canonical_norm(out_norm)
        self.eps_param = eps  # ε only scales the sos probe; x + εv is not clipped to the bounds
        resolve_eps(self.norm, eps, self.bounds)  # a bad ε fails here, not at the first step
        self.form = form
        self.iterations = (1 if warm_start else 10) if iterations is None else int(iterations)
        if self.iterations < 1:
            raise ValueError(f"iterations must be ≥ 1, got {iterations}")
        self.warm_start = bool(warm_start)
        self.seed = int(seed)
        self.bn_policy = check_policy(bn_policy)
        self.perturbed_bn_policy = check_policy(perturbed_bn_policy)
        self.register_buffer("u_buf", None)  # (N_train, K), allocated by setup (warm start only)

    @property
    def eps(self) -> float:
        return resolve_eps(self.norm, self.eps_param, self.bounds)

    @property
    def per_example_state(self) -> bool:
        return self.warm_start

    def setup(self, model: nn.Module | None, train_x: torch.Tensor,
              bounds: tuple[float, float] | None = None) -> None:
        """Warm start: allocate one output-space u per training example, drawn from a seeded
        generator (the same on every rank and device; a resumed run then loads it)."""
        super().setup(model, train_x, bounds)
        if not self.warm_start:
            return
        if model is None:
            raise ValueError("opnorm with warm_start=True needs the model in setup(model, train_x)")
        with torch.no_grad(), run_mode(model, "eval"):
            k = model(train_x[:1]).shape[1]  # the number of outputs
        gen = torch.Generator().manual_seed(self.seed)
        u = torch.randn((len(train_x), k), generator=gen, dtype=torch.float32)
        self.u_buf = steepest(u, dual_norm(self.out_norm)).to(train_x.device)

    def estimate(self, model: nn.Module, x: torch.Tensor, index: torch.Tensor | None = None, *,
                 shared: Graph | None = None, final_product: bool = True,
                 v0: torch.Tensor | None = None, ranks: Ranks = RANKS) -> PowerResult:
        """The power method for this batch (warm-started from, and written back to, the buffer
        on every rank of ``ranks``); ``shared``, ``final_product`` and (without warm start) the
        random start ``v0`` as in :func:`~gradreg.jacobian.power_method`."""
        if not self.warm_start:
            return power_method(model, x, norm=self.norm, out_norm=self.out_norm, iterations=self.iterations,
                                v0=v0, bn_policy=self.bn_policy, shared=shared, final_product=final_product)
        if index is None:
            raise RuntimeError("opnorm with warm_start=True needs the batch's example indices (ctx.index)")
        buf = self.u_buf
        if buf is None:
            raise RuntimeError("opnorm with warm_start=True needs setup(model, train_x) before the first step")
        idx = index.to(buf.device)
        # the closing product Jv is always taken: it gives the u to keep
        res = power_method(model, x, norm=self.norm, out_norm=self.out_norm, iterations=self.iterations,
                           u0=buf[idx], bn_policy=self.bn_policy, shared=shared)
        # Under torch.distributed every rank keeps the whole buffer (our choice: an epoch's new
        # permutation sends each example to another rank) and writes every rank's rows, so
        # the buffers stay identical and rank 0's checkpoint holds them all.
        all_idx, all_u = ranks.gather_rows(idx, res.u.to(buf))
        buf[all_idx] = all_u
        return res

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        eps = self.eps
        if self.form == "sos" and eps == 0:
            return Term(x.new_zeros(()))
        shared = ctx.graph_in(model, self.bn_policy)  # the power method on the clean pass when it may
        # the sos form needs v alone; uJv needs u = ψ_q(Jv) too
        # a cold start draws from the loop's rank-independent noise: the same v for any split
        v0 = None if self.warm_start else ctx.noise_like(torch.randn, x.detach())
        res = self.estimate(model, x, ctx.index, shared=shared, final_product=self.form == "uJv", v0=v0,
                            ranks=ctx.ranks)
        policy = perturbed_policy(model, self.perturbed_bn_policy)
        if self.form == "sos":
            clean = clean_logits(model, x, ctx, self.perturbed_bn_policy)  # (N, K)
            with run_mode(model, policy):
                pert = model(same_layout(x + eps * res.v, x))  # (N, K)
            return Term(0.5 * (flat_norm(pert - clean, self.out_norm) ** 2).mean())
        # uJv = ⟨Jᵀu, v⟩; create_graph keeps it differentiable in θ
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            graph = ctx.graph_in(model, policy)
            if graph is not None:
                x_in, out = graph.x_in, graph.logits
            else:
                x_in = x.detach().requires_grad_(True)
                with run_mode(model, policy):
                    out = model(x_in)
            (jtu,) = torch.autograd.grad(out, x_in, res.u, create_graph=create_graph, retain_graph=True,
                                         allow_unused=True)
        if jtu is None:
            return Term(x.new_zeros(()))
        ujv = (jtu * res.v).flatten(1).sum(dim=1)  # (N,)
        return Term(0.5 * (ujv ** 2).mean())


def spectral_layers(model: nn.Module) -> list[nn.Linear | nn.modules.conv._ConvNd]:
    """The layers whose weights ``snr`` regularizes: every Linear and convolution, in module order."""
    return [m for m in unwrap(model).modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


@PENALTIES.register("snr")
class SpectralNorm(Penalty):
    """Global spectral-norm regularization (λ/2)·Σ_l σ(W_l)², one power iteration per layer per step.

    σ by one power iteration per layer per call with persistent u_l. The u vectors are buffers
    ``u0, u1, …`` (layer order of :func:`spectral_layers`), allocated by ``setup(model, …)``
    (called standalone without setup, the first call allocates them). σ = uᵀWv with u, v
    detached is differentiable in W (its gradient is u vᵀ). Transposed convolutions are
    reshaped as stored (in × out·k·k)."""

    default_lam = 0.01  # our choice
    requires = Requirements(clean_graph=False, input_dependent=False)

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self._n_layers = 0

    def setup(self, model: nn.Module | None, train_x: torch.Tensor,
              bounds: tuple[float, float] | None = None) -> None:
        super().setup(model, train_x, bounds)
        if model is None:
            raise ValueError("snr needs the model in setup(model, train_x): one u per layer")
        self.bind(model)

    def bind(self, model: nn.Module) -> None:
        """Create one u per layer (seeded, deterministic)."""
        gen = torch.Generator().manual_seed(self.seed)
        layers = spectral_layers(model)
        for i, layer in enumerate(layers):
            w = layer.weight
            u = torch.randn(w.shape[0], generator=gen, dtype=torch.float32)
            self.register_buffer(f"u{i}", (u / u.norm()).to(device=w.device, dtype=w.dtype))
        self._n_layers = len(layers)

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        layers = spectral_layers(model)
        if self._n_layers == 0:
            self.bind(model)
        if self._n_layers != len(layers):
            raise ValueError(f"snr was set up for a model with {self._n_layers} layers, this one has {len(layers)}")
        total = x.new_zeros(())
        for i, layer in enumerate(layers):
            w = layer.weight.flatten(1)  # (out, in·k·k)
            name = f"u{i}"
            u = self._buffers[name]
            assert u is not None
            if u.shape != (w.shape[0],):
                raise ValueError(f"snr state {name} has shape {tuple(u.shape)}, but layer {i} of the model has "
                                 f"{w.shape[0]} outputs: the state belongs to another architecture")
            if u.device != w.device or u.dtype != w.dtype:
                u = self._buffers[name] = u.to(w)
            with torch.no_grad():
                v = w.t() @ u  # (in·k·k,)
                v = v / v.norm().clamp_min(1e-12)
                u_new = w @ v  # (out,)
                u_new = u_new / u_new.norm().clamp_min(1e-12)
                u.copy_(u_new)  # the buffer moves on; u_new stays as autograd saved it
            sigma = u_new @ (w @ v)  # σ(W) estimate, differentiable in W
            total = total + 0.5 * sigma ** 2
        return Term(total)


@PENALTIES.register("opnorm-at")
class OperatorNormAT(Penalty):
    """Adversarial-training counterpart of opnorm (Roth et al. 2020): λ·max_{x*∈B_ε} ½‖f(x) − f(x*)‖₂².

    ℓ2 PGD from a uniform point of the ball (mean over the batch); defaults (our choice) ε = 0.5,
    10 steps of size ε: a large step is the regime in which the PGD iteration is the power
    method (α → ∞)."""

    default_lam = 1.0  # our choice

    def __init__(self, *, eps: float | str | None = None, norm: str = "l2", steps: int = 10,
                 rel_stepsize: float = 1.0, random_start: bool = True, bounds: tuple[float, float] | None = None,
                 bn_policy: BNPolicy = "eval", perturbed_bn_policy: BNPolicy = "frozen") -> None:
        super().__init__(bounds=bounds)
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        self.norm = canonical_norm(norm)
        self.eps_param = eps
        self.steps = int(steps)
        self.rel_stepsize = float(rel_stepsize)
        self.random_start = bool(random_start)
        self.bn_policy = check_policy(bn_policy)
        self.perturbed_bn_policy = check_policy(perturbed_bn_policy)

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(norm=self.norm, eps=resolve_eps(self.norm, self.eps_param, self.bounds),
                           bounds=self.bounds)

    def attack(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None,
               ctx: CleanPass | None = None) -> torch.Tensor:
        """The detached maximizer x* of ½‖f(x) − f(x*)‖₂², under ``bn_policy``."""
        x = x.detach()
        with torch.no_grad(), run_mode(model, self.bn_policy):
            target = model(x)  # (N, K)

        def loss_fn(logits: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
            return 0.5 * (logits - target).pow(2).sum(dim=1)

        with torch.enable_grad():
            return pgd(model, x, self.threat, loss_fn, steps=self.steps, rel_stepsize=self.rel_stepsize,
                       random_start=self.random_start, generator=generator,
                       sampler=None if ctx is None else ctx.sampler, bn_policy=self.bn_policy)

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        threat = self.threat
        if threat.eps == 0:
            return Term(x.new_zeros(()))
        x_adv = self.attack(model, x, ctx=ctx)
        clean = clean_logits(model, x, ctx, self.perturbed_bn_policy)  # (N, K)
        with run_mode(model, perturbed_policy(model, self.perturbed_bn_policy)):
            adv = model(x_adv)  # (N, K)
        return Term(0.5 * (clean - adv).pow(2).sum(dim=1).mean())
