"""gradreg's version, in a module of its own so that every layer can record it (run metadata,
``--version``) without importing the package's API facade (:mod:`gradreg`)."""
from __future__ import annotations

__version__ = "0.1.0"  # keep equal to pyproject.toml's
