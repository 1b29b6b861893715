"""gradreg: adversarially robust training by input-gradient regularization.

One objective (task loss + Σ λᵢ·penaltyᵢ) for the DataGrad, Lyu, GN/SGR, ARR/TRADES and
operator-norm families, with the attacks and the evaluation harness that judge them.

The Python API (see the README)::

    import gradreg
    pen = gradreg.penalties.make("gn")                 # pen(model, x, y) -> scalar
    atk = gradreg.attacks.make("pgd", steps=20)        # atk(model, x, y, threat) -> x_adv
    threat = gradreg.ThreatModel("linf", 8 / 255, (0.0, 1.0))
    result = gradreg.evaluate(model, x, y, threat)     # accuracies with n and intervals
    run = gradreg.train(data="digits", method="gn", out="runs/gn")
"""
from __future__ import annotations

__version__ = "0.1.0"

import types as _types
from typing import Any as _Any

from .threat import ThreatModel  # noqa: E402


class _CallableModule(_types.ModuleType):
    """A module that can also be called: ``gradreg.evaluate(...)`` / ``gradreg.train(...)``
    while ``gradreg.evaluate`` and ``gradreg.train`` stay importable modules."""

    def __call__(self, *args: _Any, **kwargs: _Any) -> _Any:
        return type(self)._calls[self.__name__](*args, **kwargs)

    _calls: dict[str, _Any] = {}


def _make_callable(module: _types.ModuleType, fn: _Any) -> None:
    _CallableModule._calls[module.__name__] = fn
    module.__class__ = _CallableModule


from . import api, attacks, data, models, penalties, plugins, stats  # noqa: E402
from . import evaluate, train  # noqa: E402  (modules, made callable below)
from .api import EvaluationResult  # noqa: E402

_make_callable(evaluate, api.evaluate)
_make_callable(train, api.train)

__all__ = ["ThreatModel", "EvaluationResult", "evaluate", "train", "penalties", "attacks", "models", "data",
           "stats", "plugins", "__version__"]
