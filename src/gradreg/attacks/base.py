"""The attack interface shared by every family.

An attack is a callable ``attack(model, x, y, threat) -> x_adv`` built by
``gradreg.attacks.make(name, **params)``. Beyond the single call, every attack answers a whole
robustness curve in one call (foolbox 3's view)::

    attack = make("pgd", steps=40)
    x_advs = attack.perturb_multi(model, x, y, threat, [0, 0.1, 0.2])   # (K, N, ...)
    success = attack.success_curve(model, x, y, threat, [0, 0.1, 0.2])  # (K, N) bool

The multi-ε loop runs the radii in increasing order and attacks only the inputs that are not
yet misclassified: an adversarial example found at a smaller ε lies in every larger ball, so it
is carried over and needs no more work. The curve is therefore the *cumulative* success
``success[k] = OR_{j ≤ k} success_alone[j]`` (with the clean misclassifications as ε = 0).

Every attack

- runs the model under an explicit BatchNorm policy (``bn_policy="eval"`` by default) and
  restores the mode of every submodule it found, also on error (:func:`gradreg.modes.run_mode`);
- attacks the true labels or the model's predicted labels (``labels="true" | "predicted"``;
  predicted labels avoid label leaking, Kurakin et al. 2017, and are what the SGR paper uses);
- is vectorized over the batch and device-agnostic (tensors follow ``x.device``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..inference import predict
from ..modes import BN_POLICIES, BNPolicy, run_mode
from ..threat import ThreatModel, parse_eps

Labels = Literal["true", "predicted"]
LABELS: tuple[str, ...] = ("true", "predicted")


class Attack:
    """Base class: subclasses implement :meth:`_perturb` (model already in the policy's mode).

    Class attributes describe the family to the judge and the test table:

    - ``deterministic``: the same inputs always give the same output (no random draws);
    - ``eps_is_radius``: ε is the radius of the threat ball (False for the LRC noise, whose ε is
      a noise strength; the judge then checks the bounds only).
    """

    deterministic: bool = True
    eps_is_radius: bool = True

    def __init__(self, *, name: str, norms: Sequence[str], labels: Labels = "true",
                 bn_policy: BNPolicy = "eval", seed: int = 0) -> None:
        if labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
        if bn_policy not in BN_POLICIES:
            raise ValueError(f"unknown BatchNorm policy {bn_policy!r}; use one of {BN_POLICIES}")
        self.name = name
        self.norms = tuple(norms)
        self.labels: Labels = labels
        self.bn_policy: BNPolicy = bn_policy
        self.seed = int(seed)

    # -- public API -------------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        """Adversarial examples ``(N, ...)`` for the threat model (detached, same device as ``x``)."""
        self.check_threat(threat)
        x = x.detach()
        with run_mode(model, self.bn_policy), torch.enable_grad():  # works even under torch.no_grad()
            y_att = self.attack_labels(model, x, y)
            return self._perturb(model, x, y_att, threat).detach()

    def perturb_multi(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                      eps_list: Sequence[float], *, carry_over: bool = True) -> torch.Tensor:
        """Adversarial examples for every ε of ``eps_list``: ``(K, N, ...)``, in the order given.

        With ``carry_over`` (the default), inputs already misclassified (w.r.t. the attack's
        labels) at a smaller ε — or clean — are carried over unchanged to the larger ones, so only
        the still-robust inputs are attacked again. ``carry_over=False`` attacks every input
        afresh at every ε (for transfer attacks, where the attacked model is not the judged one,
        and for the judge's raw per-ε curve, which its gradient-masking check needs); the
        0-ball of a radius attack is then answered with ``x`` itself, without running the attack.
        """
        self.check_threat(threat)
        eps_values = [parse_eps(e) for e in eps_list]
        x = x.detach()
        out = x.new_empty((len(eps_values), *x.shape))  # (K, N, ...)
        with run_mode(model, self.bn_policy), torch.enable_grad():
            y_att = self.attack_labels(model, x, y)
            if not carry_over:
                for k, e in enumerate(eps_values):
                    if e == 0 and self.eps_is_radius:  # the 0-ball holds x alone: no attack to run
                        out[k] = x
                        continue
                    out[k] = self._perturb(model, x, y_att, threat.with_eps(e)).detach()
                return out
            with run_mode(model, "eval"):
                fooled = predict(model, x) != y_att  # (N,) already misclassified at ε = 0
            current = x.clone()
            for k in sorted(range(len(eps_values)), key=lambda i: eps_values[i]):
                todo = (~fooled).nonzero().squeeze(1)  # (M,)
                if todo.numel() and (eps_values[k] > 0 or not self.eps_is_radius):
                    x_sub = self._perturb(model, x[todo], y_att[todo], threat.with_eps(eps_values[k])).detach()
                    with run_mode(model, "eval"):
                        hit = predict(model, x_sub) != y_att[todo]  # (M,)
                    if self.eps_is_radius:
                        # carry over only successes: a failed point at ε_j is no help at ε_k > ε_j
                        current[todo[hit]] = x_sub[hit]
                        fooled[todo[hit]] = True
                        out[k] = current
                        out[k, todo[~hit]] = x_sub[~hit]
                        continue
                    # a noise strength is not a radius: report this ε's own samples
                    current = current.clone()
                    current[todo] = x_sub
                out[k] = current
        return out

    def success_curve(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                      eps_list: Sequence[float]) -> torch.Tensor:
        """Per-ε success ``(K, N)`` bool: the attack's output at ε is misclassified.

        Judged against the true labels ``y`` with the model in eval mode. (The judge,
        :mod:`gradreg.judge`, does not trust this: it re-checks and re-judges every point.)
        """
        x_advs = self.perturb_multi(model, x, y, threat, eps_list)  # (K, N, ...)
        y = y.to(x.device)
        with run_mode(model, "eval"):
            return torch.stack([predict(model, xa) != y for xa in x_advs])

    # -- helpers for subclasses ---------------------------------------------------------------
    def check_threat(self, threat: ThreatModel) -> None:
        if threat.norm not in self.norms:
            raise ValueError(f"attack {self.name!r} supports norms {', '.join(self.norms)}, not {threat.norm!r}")

    def attack_labels(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The labels the attack moves away from: ``y`` or the model's predictions (in eval mode)."""
        if self.labels == "true":
            return y.to(x.device)
        with run_mode(model, "eval"):
            return predict(model, x)

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed``: each call of a random attack is reproducible."""
        return torch.Generator().manual_seed(self.seed)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in ("name", "norms"))
        return f"{type(self).__name__}({self.name!r}, {params})"
