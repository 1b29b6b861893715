"""A small name → factory registry shared by data sets, models, attacks and penalties.

The CLI resolves names through these registries and the test-suite iterates over them, so
registering a new member is all it takes to get it on the command line and under test.

Third-party packages add members through entry points (see :mod:`gradreg.plugins` for the
groups and what a plugin declares): a registry with an ``entry_point_group`` loads that group
the first time it is asked for its names or for a name it does not hold. The loading is here,
beside the registry it fills, so that this bottom module imports nothing of gradreg.

Our choices: a plugin cannot replace a built-in member (same name: skipped with a warning),
and a plugin that fails to import is reported as a warning, so one broken package does not
stop every command.
"""
from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from types import ModuleType
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., object])


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; its message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to factories. ``make(name, **params)`` builds a member."""

    def __init__(self, kind: str, *, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._factories: dict[str, Callable[..., T]] = {}
        self._docs: dict[str, str] = {}
        self.origins: dict[str, str] = {}  # name → distribution, for members added by plugins
        self.aliases: dict[str, str] = {}  # alias → the name it builds
        self._plugins_loaded = entry_point_group is None

    def register(self, name: str, *, doc: str | None = None, origin: str | None = None) -> Callable[[F], F]:
        """Register a factory (a function, or a class registered directly) under ``name``."""

        def decorator(factory: F) -> F:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = cast(Callable[..., T], factory)  # a factory of T by contract
            first_line = (doc or factory.__doc__ or "").strip().splitlines()
            self._docs[name] = first_line[0] if first_line else ""
            if origin is not None:
                self.origins[name] = origin
            return factory

        return decorator

    def register_alias(self, alias: str, target: str, *, doc: str) -> None:
        """Register ``alias`` as a second name of the member ``target`` (already registered): it
        builds exactly what ``target`` builds; ``doc`` (one line) says what it is an alias of,
        and ``describe`` shows it."""
        if alias in self._factories:
            raise ValueError(f"{self.kind} {alias!r} is registered twice")
        self._factories[alias] = self.get(target)
        self._docs[alias] = doc.strip().splitlines()[0]
        self.aliases[alias] = target

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a member registered for a while, e.g. by a test or a notebook cell);
        unknown names are ignored."""
        self._factories.pop(name, None)
        self._docs.pop(name, None)
        self.aliases.pop(name, None)

    def load_plugins(self) -> None:
        """Register this registry's entry-point members (once)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # first: a plugin that asks the registry must not recurse
        load_group(self)

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._factories:
            self.load_plugins()
        try:
            return self._factories[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._factories, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._factories))})"
            ) from None

    def make(self, name: str, **params: object) -> T:
        return self.get(name)(**params)

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._factories)

    def describe(self) -> dict[str, str]:
        return {n: self._docs[n] for n in self.names()}

    def __contains__(self, name: object) -> bool:
        if name not in self._factories:
            self.load_plugins()
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


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
