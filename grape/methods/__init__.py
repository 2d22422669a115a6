"""Expert-pruning methods, looked up by the name the CLI's ``--method`` takes.

Importing a method's module registers it (``@register`` in its file), so adding a method is one
new module plus one import line here.
"""

from __future__ import annotations

from grape.methods import (  # noqa: F401  (imported to register the methods)
    ean,
    frequency,
    global_soft_activation,
    grape,
    grape_paper,
    naee,
    random,
    reap,
    soft_activation,
)
from grape.methods.base import REGISTRY, ExpertPruningMethod, PruningPlan

__all__ = ["ExpertPruningMethod", "PruningPlan", "available_methods", "get_method"]


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(REGISTRY)


def get_method(name: str) -> type[ExpertPruningMethod]:
    """The method class registered as ``name``; instantiate it with ``merge``, ``seed``, options.

    Raises:
        ValueError: unknown name (the message lists the available ones).
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown pruning method {name!r}; available: {', '.join(available_methods())}"
        ) from None
