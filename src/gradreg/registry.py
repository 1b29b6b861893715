"""A small name → factory registry shared by data sets, models, attacks and penalties.

The CLI resolves names through these registries and the test-suite iterates over them, so
registering a new member is all it takes to get it on the command line and under test.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, cast

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., object])


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; its message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to factories. ``make(name, **params)`` builds a member."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, *, doc: str | None = None) -> Callable[[F], F]:
        """Register a factory (a function, or a class registered directly) under ``name``."""

        def decorator(factory: F) -> F:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = cast(Callable[..., T], factory)  # a factory of T by contract
            first_line = (doc or factory.__doc__ or "").strip().splitlines()
            self._docs[name] = first_line[0] if first_line else ""
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
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
        return sorted(self._factories)

    def describe(self) -> dict[str, str]:
        return {n: self._docs[n] for n in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
