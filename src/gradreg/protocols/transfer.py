"""Transfer attacks: PGD examples crafted on a source model (or its twin, another seed) and
replayed against every target, judged like any attack."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..attacks.base import Attack
from ..data import DataBundle
from ..judge import evaluate_attack
from ..threat import ThreatModel
from .settings import EvalSettings, test_subset

class _Precomputed(Attack):
    """Replays adversarial examples crafted elsewhere (a transfer attack) so that the judging
    stays in :func:`gradreg.judge.evaluate_attack`."""

    def __init__(self, x_advs: torch.Tensor, source: str) -> None:
        super().__init__(name=f"pgd from {source}", norms=("linf", "l2", "l1"))
        self.x_advs = x_advs  # (K, N, ...)
        self.offset = 0

    def perturb_multi(self, model, x, y, threat, eps_list, **kwargs):
        out = self.x_advs[:, self.offset:self.offset + len(x)].to(x.device)
        self.offset += len(x)
        return out


def craft(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, threat: ThreatModel,
          eps: Sequence[float], *, batch_size: int) -> torch.Tensor:
    """Adversarial examples ``(K, N, ...)`` for every ε, in batches, on the model's device."""
    dev = next(model.parameters()).device
    # carry_over=False: every input is attacked at every ε, also those the source model already
    # gets wrong — a transferred example must be a real attempt, not the clean input
    return torch.cat([attack.perturb_multi(model, x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev),
                                           threat, eps, carry_over=False).cpu()
                      for i in range(0, len(y), batch_size)], dim=1)


def transfer_flags(models: dict[str, nn.Module], bundle: DataBundle, settings: EvalSettings, *,
                   sources: Sequence[str] | None = None,
                   source_models: dict[str, nn.Module] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``out[source][target]``: ``(K, n)`` bool, target robust at every ε of the grid against PGD
    examples crafted on the source. The source model is ``source_models[source]`` when given (a
    twin: the same method trained with another seed), else ``models[source]`` (white-box on the
    diagonal). Each source's examples are crafted once."""
    x, y = test_subset(bundle, settings.n_test)
    grid = settings.checked_grid(bundle)
    threat = ThreatModel(settings.norm, 0.0, bundle.bounds)
    pgd = settings.make_attack("pgd")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for s in sources if sources is not None else list(models):
        crafter = (source_models or {}).get(s, models.get(s))
        if crafter is None:
            raise ValueError(f"no model for transfer source {s!r}")
        x_advs = craft(crafter, x, y, pgd, threat, grid, batch_size=settings.batch_size)
        out[s] = {}
        for t, target in models.items():
            replay = _Precomputed(x_advs, s)
            rep = evaluate_attack(target, x, y, replay, threat, grid, batch_size=len(y) or 1, progress=False)
            out[s][t] = rep.robust
    return out


def transfer_matrix(models: dict[str, nn.Module], bundle: DataBundle, settings: EvalSettings,
                    *, sources: Sequence[str] | None = None,
                    source_models: dict[str, nn.Module] | None = None) -> dict[str, dict[str, list[float]]]:
    """``out[source][target]`` = accuracy of ``target`` per ε (see :func:`transfer_flags`)."""
    flags = transfer_flags(models, bundle, settings, sources=sources, source_models=source_models)
    return {s: {t: f.double().mean(dim=1).tolist() for t, f in row.items()} for s, row in flags.items()}


