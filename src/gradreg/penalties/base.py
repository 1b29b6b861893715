"""The penalty interface: a penalty computes a :class:`Term` from the model and a clean pass.

A penalty is an ``nn.Module`` with

- ``requires``: one frozen :class:`Requirements` value per instance, what it needs from the
  clean pass (read by :mod:`gradreg.schedule`, which plans the step from it);
- ``term(model, x, y, ctx) -> Term``: the computation, from the model, the batch and the
  clean pass ``ctx`` (:class:`~gradreg.cleanpass.CleanPass`), which offers the results a
  penalty may take from the shared pass (``ctx.logits_in(model, policy)``, …) and None where
  the penalty must run its own pass;
- ``setup(model, train_x, bounds)``: called once before training; allocates every piece of
  state (buffers, so ``state_dict()`` / ``load_state_dict()`` checkpoint it exactly) and takes
  the input bounds of the data set's threat model.

Called as ``penalty(model, x, y)`` it returns the scalar penalty (mean over the batch), so
``loss = ce + lam * penalty(model, x, y)`` works in any training loop. A penalty never reads
or writes how the step is scheduled (shared pass, fused mode, double-backward kernels).
"""
from __future__ import annotations

import torch
from torch import nn

# the types shared with the scheduler live below both (gradreg.cleanpass); re-exported here
from ..cleanpass import BatchNoise, CleanPass, Requirements, Term, main_targets, own_pass, split_targets, with_clean_part

DEFAULT_BOUNDS = (0.0, 1.0)
"""The image box, used only when neither the constructor nor ``setup`` gives bounds (our choice)."""


class Penalty(nn.Module):
    """Base class of every regularizer in the registry (see the module doc).

    ``default_lam`` is λ when the user gives none; ``task_weight`` the weight of the clean task
    loss when this penalty is the method (1 for a regularizer; 0 for adversarial training, whose
    term is the whole clean/adversarial mixture)."""

    requires: Requirements = Requirements()
    default_lam: float = 1.0
    task_weight: float = 1.0

    def __init__(self, *, bounds: tuple[float, float] | None = None) -> None:
        super().__init__()
        self._given_bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))
        self.bounds: tuple[float, float] = self._given_bounds or DEFAULT_BOUNDS

    @property
    def input_dependent(self) -> bool:
        return self.requires.input_dependent

    @property
    def per_example_state(self) -> bool:
        """Whether ``setup`` keeps state for every training row (looked up by ``ctx.index``), so
        it needs the whole training set, not a sample of it (the trainer's streaming path)."""
        return False

    def setup(self, model: nn.Module | None, train_x: torch.Tensor,
              bounds: tuple[float, float] | None = None) -> None:
        """Called once by the training loop before the first step, with the model, the whole
        training set ``(N, C, H, W)`` and the data set's input bounds; allocates all state. Must
        be deterministic: resume calls it again before loading state. Bounds given to the
        constructor win over the data set's. Subclasses extend it (and call this one)."""
        if bounds is not None and self._given_bounds is None:
            self.bounds = (float(bounds[0]), float(bounds[1]))

    def term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass) -> Term:
        """The penalty of batch ``(x, y)`` from the clean pass ``ctx``, which holds what
        ``requires`` asks for."""
        raise NotImplementedError

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: CleanPass | None = None) -> torch.Tensor:
        """The scalar penalty (mean over the batch), differentiable in the model's parameters.
        Without ``ctx`` (or with one that lacks the input gradient it needs) the penalty makes
        its own clean pass, without moving BatchNorm's running statistics: the scheduler's rule
        for a term on its own pass (:func:`gradreg.cleanpass.own_pass`, ``with_clean_part``)."""
        own = own_pass(model, x, y, self.requires, ctx)
        return with_clean_part(self.term(model, x, y, own).value, self.requires, own)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "training")


__all__ = ["BatchNoise", "CleanPass", "DEFAULT_BOUNDS", "Penalty", "Requirements", "Term", "main_targets",
           "split_targets"]
