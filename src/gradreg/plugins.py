"""Plugins: third-party packages add models, data sets, penalties and attacks through entry
points, and gradreg's registries (hence the CLI, ``gradreg list`` and the Python API) see
them like built-in members.

A package declares, in its ``pyproject.toml``::

    [project.entry-points."gradreg.models"]
    my-net = "my_package.models:my_net"          # a factory: registered under "my-net"

    [project.entry-points."gradreg.penalties"]
    my-penalties = "my_package.penalties"       # a module: imported; it registers members itself

Groups: ``gradreg.models``, ``gradreg.data``, ``gradreg.penalties``, ``gradreg.attacks``. A
factory takes the same keyword parameters as the built-in members of its registry (a model
factory ``in_shape``, ``num_classes``, ``mean``, ``std``, ``aux_classes``; a data factory
``data_dir``, ``download``) and returns the same kind of object. A group is loaded the first
time its registry is asked for its names or for an unknown name.

Our choices (a built-in member wins over a plugin's of the same name, a broken plugin is a
warning) and the loading itself live in :mod:`gradreg.registry`, beside the registries they
fill; this module names the groups and loads them all at once.
"""
from __future__ import annotations

from .registry import PluginWarning, load_group

GROUPS = ("gradreg.models", "gradreg.data", "gradreg.penalties", "gradreg.attacks")

__all__ = ["GROUPS", "PluginWarning", "load_all", "load_group"]


def load_all() -> None:
    """Load every group now (``gradreg list`` does; everything else loads lazily)."""
    from . import attacks, data, models, penalties

    for reg in (models.MODELS, data.DATASETS, penalties.PENALTIES, attacks.ATTACKS):
        reg.load_plugins()
