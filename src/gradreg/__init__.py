"""gradreg: adversarially robust training by input-gradient regularization.

One objective (task loss + Σ λᵢ·penaltyᵢ) for the DataGrad, Lyu, GN/SGR, ARR/TRADES and
operator-norm families, with the attacks and the evaluation harness that judge them.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .threat import ThreatModel  # noqa: E402

__all__ = ["ThreatModel", "__version__"]
