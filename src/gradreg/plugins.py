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

Our choices: a plugin cannot replace a built-in member (same name: skipped with a warning),
and a plugin that fails to import is reported as a warning, so one broken package does not
stop every command.
"""
from __future__ import annotations

import warnings
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .registry import Registry

GROUPS = ("gradreg.models", "gradreg.data", "gradreg.penalties", "gradreg.attacks")


class PluginWarning(UserWarning):
    """A plugin entry point that could not be registered."""


def _origin(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else ep.value


def load_group(registry: Registry[Any]) -> None:
    """Register every entry point of ``registry.entry_point_group``."""
    group = registry.entry_point_group
    if group is None:
        return
    for ep in metadata.entry_points(group=group):
        if ep.name in registry._factories:
            if registry.origins.get(ep.name) is None:
                warnings.warn(f"plugin {_origin(ep)}: {registry.kind} {ep.name!r} is built in; the plugin's is "
                              "ignored", PluginWarning, stacklevel=2)
            continue
        try:
            obj = ep.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin must not break every command
            warnings.warn(f"plugin {_origin(ep)}: cannot load {group} entry point {ep.name!r} = {ep.value!r} "
                          f"({type(err).__name__}: {err})", PluginWarning, stacklevel=2)
            continue
        if isinstance(obj, ModuleType):
            continue  # imported: its decorators registered its members
        if not callable(obj):
            warnings.warn(f"plugin {_origin(ep)}: {group} entry point {ep.name!r} is not a factory",
                          PluginWarning, stacklevel=2)
            continue
        registry.register(ep.name, origin=_origin(ep))(obj)


def load_all() -> None:
    """Load every group now (``gradreg list`` does; everything else loads lazily)."""
    from . import attacks, data, models, penalties

    for reg in (models.MODELS, data.DATASETS, penalties.PENALTIES, attacks.ATTACKS):
        reg.load_plugins()
