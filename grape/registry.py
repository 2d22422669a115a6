"""Name -> implementation, in one style for every pluggable kind (pruning methods, sparsity criteria).

A class registers itself under its ``name`` class attribute with ``@REGISTRY.register``. A
registry made with ``package=`` imports every module of that package the first time it is
asked for a name, so adding an implementation is one new file (plus its test): there is no
import list to keep in step. The command line takes its ``choices`` from :meth:`Registry.names`,
and an unknown name is an :class:`~grape.errors.InputError` that lists the known ones.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from grape.errors import InputError

__all__ = ["Registry"]

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one kind by name; see the module docs."""

    def __init__(self, kind: str, *, package: str | None = None) -> None:
        self.kind = kind
        self._package = package
        self._entries: dict[str, T] = {}
        self._discovered = package is None

    def register(self, cls: T) -> T:
        """Class decorator: make ``cls`` available under ``cls.name``."""
        if cls.name in self._entries:
            raise ValueError(f"{self.kind} {cls.name!r} is registered twice")
        self._entries[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._discover()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The class registered as ``name``.

        Raises:
            InputError: unknown name (the message lists the available ones).
        """
        self._discover()
        try:
            return self._entries[name]
        except KeyError:
            raise InputError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self._package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self._package}.{module.name}")
