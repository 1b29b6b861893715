"""gradreg: adversarially robust training by input-gradient regularization.

One objective (task loss + Σ λᵢ·penaltyᵢ) for the DataGrad, Lyu, GN/SGR, ARR/TRADES and
operator-norm families, with the attacks that probe them and the judge and protocols that evaluate them.

The Python API (see the README)::

    import gradreg
    pen = gradreg.penalties.make("gn")                 # pen(model, x, y) -> scalar
    atk = gradreg.attacks.make("pgd", steps=20)        # atk(model, x, y, threat) -> x_adv
    threat = gradreg.ThreatModel("linf", 8 / 255, (0.0, 1.0))
    result = gradreg.evaluate(model, x, y, threat)     # accuracies with n and intervals
    run = gradreg.train(data="digits", method="gn", out="runs/gn")
"""
from __future__ import annotations

from .version import __version__  # noqa: E402
from .threat import ThreatModel  # noqa: E402
from . import attacks, data, models, penalties, plugins, stats  # noqa: E402
from .api import EvaluationResult, evaluate, train  # noqa: E402

__all__ = ["ThreatModel", "EvaluationResult", "evaluate", "train", "penalties", "attacks", "models", "data",
           "stats", "plugins", "__version__"]
