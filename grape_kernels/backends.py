"""Which implementation runs a routed-experts layer, and one entry point that dispatches to it.

Backends (all take the ``fused_experts`` arguments, see ``grape_kernels.ops.common``):

=============  ===================================================  ==========================
name           what it is                                           devices
=============  ===================================================  ==========================
``triton``     fused grouped GEMM (``grape_kernels.triton``)        CUDA; CPU under
                                                                    ``TRITON_INTERPRET=1``
``cpu``        sorted per-expert GEMMs in PyTorch (``ops.cpu``)     CPU
``dense``      every expert on every token, masked (``ops.dense``)  any
``reference``  obvious per-expert loop, the oracle                  any
=============  ===================================================  ==========================

Routing has its own, smaller table: ``route_topk`` kernels exist as Triton code, optionally
as the compiled CUDA extension (``grape_kernels.cuda_ops``), and as the PyTorch reference.

Optional kernels are imported lazily, on first use, so a CPU-only install never imports
Triton and the registry itself costs nothing to import.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from grape_kernels.expert_weights import ExpertWeights
from grape_kernels.ops.common import ExpertsFn

__all__ = [
    "Backend",
    "ExpertWeights",
    "RouteFn",
    "available_backends",
    "backend_names",
    "experts_forward",
    "get_backend",
    "register_backend",
    "resolve_backend",
    "routing_function",
    "select_backend",
    "select_routing_backend",
]

RouteFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@functools.cache
def _import(module: str) -> ModuleType | None:
    """``module``, or None where it cannot be imported; cached, so a missing one costs one try."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or anywhere under the interpreter (how this project tests them)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _import("grape_kernels.triton") is not None


def _cuda_routing_usable(device: torch.device) -> bool:
    cuda_ops = _import("grape_kernels.cuda_ops")
    return device.type == "cuda" and cuda_ops is not None and cuda_ops.available()


@dataclass(frozen=True)
class Backend:
    """One experts implementation.

    Attributes:
        name: registry key (``backend=`` argument everywhere).
        load: returns the experts function; called on first use so optional kernels import lazily.
        usable: whether the backend can run on a device in this process.
    """

    name: str
    load: Callable[[], ExpertsFn]
    usable: Callable[[torch.device], bool]


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _BACKENDS[backend.name] = backend


def _load(module: str, attr: str) -> Callable[[], Callable]:
    """A loader for ``module.attr`` that imports on first use (for optional kernels)."""

    def load() -> Callable:
        loaded = _import(module)
        if loaded is None:
            raise ImportError(f"{module} cannot be imported here")
        return getattr(loaded, attr)

    return load


register_backend(Backend("triton", _load("grape_kernels.triton", "fused_experts"), _triton_usable))
register_backend(Backend("cpu", _load("grape_kernels.ops.cpu", "cpu_experts"), lambda d: d.type == "cpu"))
register_backend(Backend("dense", _load("grape_kernels.ops.dense", "dense_experts"), lambda d: True))
register_backend(Backend("reference", _load("grape_kernels.ops.reference", "reference_experts"), lambda d: True))


def backend_names() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``, or a ``ValueError`` listing the registered ones."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown experts backend {name!r}; registered: {backend_names()} (or 'auto')") from None


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` in this process."""
    device = torch.device(device)
    return [name for name, backend in _BACKENDS.items() if backend.usable(device)]


def select_backend(device: torch.device | str) -> str:
    """Default backend for tensors on ``device``.

    CUDA: ``triton`` when it imports, else ``dense`` (the one fallback without host syncs).
    CPU: ``cpu``. Other devices: ``dense``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "triton" if _triton_usable(device) else "dense"
    return "cpu" if device.type == "cpu" else "dense"


def resolve_backend(backend: str, device: torch.device | str) -> Backend:
    """The backend ``backend`` names (``"auto"``: chosen by device), checked to run on ``device``."""
    device = torch.device(device)
    resolved = get_backend(select_backend(device) if backend == "auto" else backend)
    if not resolved.usable(device):
        raise ValueError(
            f"experts backend {resolved.name!r} cannot run on {device} in this process; "
            f"usable there: {available_backends(device)}"
        )
    return resolved


# ---- routing -----------------------------------------------------------------------------
_ROUTING: dict[str, Callable[[], RouteFn]] = {
    "cuda": _load("grape_kernels.cuda_ops", "route_topk"),
    "triton": _load("grape_kernels.triton", "route_topk"),
    "reference": _load("grape_kernels.ops.reference", "reference_route_topk"),
}


def select_routing_backend(device: torch.device | str, backend: str = "auto") -> str | None:
    """Routing kernel to pair with experts ``backend`` on ``device``; None keeps the model's router.

    A fused routing kernel is worth swapping in only beside a GPU experts backend (the compiled
    CUDA op when it is built, else Triton); ``reference`` pairs with the reference routing so a
    whole model can run on the oracle. On the CPU the model's own PyTorch router is already
    what a "kernel" would be, so ``cpu`` and ``dense`` keep it.
    """
    device = torch.device(device)
    name = select_backend(device) if backend == "auto" else get_backend(backend).name
    if name == "reference":
        return "reference"
    if name == "triton":
        return "cuda" if _cuda_routing_usable(device) else "triton"
    return None


def routing_function(name: str) -> RouteFn:
    """The ``route_topk``-compatible function of routing backend ``name``."""
    if name not in _ROUTING:
        raise ValueError(f"unknown routing backend {name!r}; registered: {list(_ROUTING)}")
    return _ROUTING[name]()


def experts_forward(
    module_or_weights: nn.Module | ExpertWeights | tuple[torch.Tensor, torch.Tensor],
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    backend: str = "auto",
    **layout,
) -> torch.Tensor:
    """Run one routed-experts layer (T, H) -> (T, H) on ``backend`` (``"auto"``: by device).

    ``module_or_weights`` is a transformers experts module, an :class:`ExpertWeights`, or a
    ``(w_gate_up, w_down)`` pair; only the pair takes layout keywords (``gate_up_bias``,
    ``down_bias``, ``activation``, ``swiglu_alpha``, ``swiglu_limit``, ``transposed``,
    ``interleaved``), the other two carry their own.
    """
    if isinstance(module_or_weights, nn.Module):
        weights = ExpertWeights.from_module(module_or_weights)
    elif isinstance(module_or_weights, ExpertWeights):
        weights = module_or_weights
    else:
        w_gate_up, w_down = module_or_weights
        weights = ExpertWeights(w_gate_up, w_down, **layout)
        layout = {}
    if layout:
        raise TypeError(f"layout keywords {sorted(layout)} only apply to a (w_gate_up, w_down) pair")
    return resolve_backend(backend, hidden.device).load()(hidden, weights, topk_ids, topk_weights)
