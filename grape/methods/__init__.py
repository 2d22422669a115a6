"""Expert-pruning methods, looked up by the name the CLI's ``--method`` takes.

Every module of this package that defines a method registers it (``@register`` in its file),
and the registry imports them all on first lookup: adding a method is one new module plus its
test, with no import list here.
"""

from __future__ import annotations

from grape.methods.base import METHODS, ExpertPruningMethod, PruningPlan

__all__ = ["ExpertPruningMethod", "PruningPlan", "available_methods", "get_method"]


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return METHODS.names()


def get_method(name: str) -> type[ExpertPruningMethod]:
    """The method class registered as ``name``; instantiate it with ``merge``, ``seed``, options.

    Raises:
        InputError: unknown name (the message lists the available ones).
    """
    return METHODS.get(name)
