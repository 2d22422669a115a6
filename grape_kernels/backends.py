"""Which implementation runs a MoE layer: one registry of experts and routing backends.

Experts backends (:data:`~grape_kernels.ops.common.ExpertsFn`: ``fn(hidden, weights, ids, w)``):

=============  ===================================================  ==========================
name           what it is                                           devices
=============  ===================================================  ==========================
``triton``     fused grouped GEMM (``grape_kernels.triton``)        CUDA; CPU under
                                                                    ``TRITON_INTERPRET=1``
``vllm_cpu``   vLLM's fused CPU kernel where it is faster, else     CPU, where vLLM's CPU
               ``cpu`` (``ops.vllm_cpu``)                           build imports
``cpu``        sorted per-expert GEMMs in PyTorch (``ops.cpu``)     CPU
``dense``      every expert on every token, masked (``ops.dense``)  any
``reference``  obvious per-expert loop, the oracle                  any
=============  ===================================================  ==========================

Routing backends (``fn(logits, spec: RoutingSpec) -> (ids int32, weights float32)``):
``cuda`` (the compiled extension, ``grape_kernels.cuda_ops``), ``triton`` and ``reference``.

Selection is data, not a switch on names: a backend's ``priority`` ranks it per device type
for ``"auto"``, and a routing backend's ``pairs_with`` names the experts backends it is
swapped in beside (a fused routing kernel is worth it only next to a GPU experts kernel; on
the CPU the model's own PyTorch router already is what a kernel would be). ``usable(device)``
answers ``(ok, reason)``, so :func:`backend_status` and errors say why a backend was skipped.
A new backend is one :func:`register_backend` call (see ``grape_kernels/README.md``).

Optional kernels are imported lazily, on first use, so a CPU-only install never imports
Triton and the registry itself costs nothing to import.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType

import torch
from torch import nn

from grape_kernels.expert_weights import ExpertWeights
from grape_kernels.routing import RoutingSpec

__all__ = [
    "Backend",
    "KINDS",
    "RouteFn",
    "available_backends",
    "backend_names",
    "backend_status",
    "experts_forward",
    "get_backend",
    "register_backend",
    "resolve_backend",
    "routing_function",
    "select_backend",
    "select_routing_backend",
]

RouteFn = Callable[[torch.Tensor, RoutingSpec], tuple[torch.Tensor, torch.Tensor]]
Usability = tuple[bool, str]
KINDS = ("experts", "routing")
_ANY_DEVICE = "*"


@functools.cache
def _import(module: str) -> ModuleType | None:
    """``module``, or None where it cannot be imported; cached, so a missing one costs one try."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _everywhere(device: torch.device) -> Usability:
    return True, ""


def _cpu_only(device: torch.device) -> Usability:
    return (True, "") if device.type == "cpu" else (False, "runs on CPU tensors only")


def _triton_usable(device: torch.device) -> Usability:
    """Triton kernels run on CUDA, or anywhere under the interpreter (how this project tests them)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "Triton kernels run on CUDA devices (or anywhere under TRITON_INTERPRET=1)"
    if _import("grape_kernels.triton") is None:
        return False, "Triton is not installed (pip install triton)"
    return True, ""


def _vllm_cpu_usable(device: torch.device) -> Usability:
    if device.type != "cpu":
        return False, "vLLM's fused MoE kernel here is its CPU build's"
    module = _import("grape_kernels.ops.vllm_cpu")
    if module is None or module.vllm_cpu_ops() is None:
        return False, "vLLM's CPU build is not installed here (its CPU fused-MoE ops do not import)"
    return True, ""


def _cuda_ops_usable(device: torch.device) -> Usability:
    if device.type != "cuda":
        return False, "the CUDA extension runs on CUDA devices only"
    cuda_ops = _import("grape_kernels.cuda_ops")
    if cuda_ops is None or not cuda_ops.available():
        return False, "grape_kernels._C is not built (install with a CUDA toolkit: pip install --no-build-isolation .)"
    return True, ""


@dataclass(frozen=True)
class Backend:
    """One implementation of a MoE layer's experts or routing.

    Attributes:
        name: registry key within its kind (``backend=`` argument everywhere).
        kind: ``"experts"`` or ``"routing"``.
        load: returns the backend's function; called on first use so optional kernels import lazily.
        usable: ``(ok, reason)``: whether the backend can run on a device in this process, and
            if not, why (shown to users).
        priority: rank for automatic selection per device type (``"*"``: any device); higher
            wins, and a device type it does not list (nor ``"*"``) never selects it automatically.
        pairs_with: routing backends only: the experts backends it is swapped in beside.
    """

    name: str
    kind: str
    load: Callable[[], Callable]
    usable: Callable[[torch.device], Usability]
    priority: Mapping[str, int] = field(default_factory=dict)
    pairs_with: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"backend {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "priority", MappingProxyType(dict(self.priority)))

    def rank(self, device: torch.device) -> int | None:
        """Priority on ``device`` for automatic selection; None when never chosen automatically."""
        return self.priority.get(device.type, self.priority.get(_ANY_DEVICE))


_BACKENDS: dict[tuple[str, str], Backend] = {}
_LOADED: dict[str, Callable] = {}  # experts functions by name, for experts_forward
_RESOLVED: dict[tuple[str, str], str] = {}  # (backend asked for, device) -> experts backend name


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``(backend.kind, backend.name)``."""
    _BACKENDS[backend.kind, backend.name] = backend
    _RESOLVED.clear()


def _load(module: str, attr: str) -> Callable[[], Callable]:
    """A loader for ``module.attr`` that imports on first use (for optional kernels)."""

    def load() -> Callable:
        loaded = _import(module)
        if loaded is None:
            raise ImportError(f"{module} cannot be imported here")
        return getattr(loaded, attr)

    return load


for _backend in (
    Backend("triton", "experts", _load("grape_kernels.triton", "fused_experts"), _triton_usable, {"cuda": 30}),
    Backend("vllm_cpu", "experts", _load("grape_kernels.ops.vllm_cpu", "vllm_cpu_experts"), _vllm_cpu_usable,
            {"cpu": 25}),
    Backend("cpu", "experts", _load("grape_kernels.ops.cpu", "cpu_experts"), _cpu_only, {"cpu": 20}),
    Backend("dense", "experts", _load("grape_kernels.ops.dense", "dense_experts"), _everywhere, {_ANY_DEVICE: 10}),
    Backend("reference", "experts", _load("grape_kernels.ops.reference", "reference_experts"), _everywhere),
    Backend("cuda", "routing", _load("grape_kernels.cuda_ops", "route_topk"), _cuda_ops_usable, {"cuda": 20},
            pairs_with=("triton",)),
    Backend("triton", "routing", _load("grape_kernels.triton", "route_topk"), _triton_usable, {_ANY_DEVICE: 10},
            pairs_with=("triton",)),
    Backend("reference", "routing", _load("grape_kernels.ops.reference", "reference_route_topk"), _everywhere,
            {_ANY_DEVICE: 1}, pairs_with=("reference",)),
):
    register_backend(_backend)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown backend kind {kind!r}; expected one of {KINDS}")


def backend_names(kind: str = "experts") -> list[str]:
    _check_kind(kind)
    return [name for backend_kind, name in _BACKENDS if backend_kind == kind]


def get_backend(name: str, kind: str = "experts") -> Backend:
    """The ``kind`` backend registered as ``name``, or a ``ValueError`` listing the registered ones."""
    _check_kind(kind)
    try:
        return _BACKENDS[kind, name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} backend {name!r}; registered: {backend_names(kind)} (or 'auto')"
        ) from None


def backend_status(device: torch.device | str, kind: str = "experts") -> dict[str, Usability]:
    """``{name: (ok, reason)}`` of every ``kind`` backend on ``device``: what runs there, and why not."""
    device = torch.device(device)
    return {name: get_backend(name, kind).usable(device) for name in backend_names(kind)}


def available_backends(device: torch.device | str, kind: str = "experts") -> list[str]:
    """Names of the ``kind`` backends that can run on ``device`` in this process."""
    return [name for name, (ok, _) in backend_status(device, kind).items() if ok]


def _best(candidates: list[Backend], device: torch.device) -> Backend | None:
    ranked = [(backend.rank(device), backend) for backend in candidates if backend.rank(device) is not None]
    ranked = [(rank, backend) for rank, backend in ranked if backend.usable(device)[0]]
    return max(ranked, key=lambda item: item[0])[1] if ranked else None


def select_backend(device: torch.device | str) -> str:
    """Default experts backend for tensors on ``device``: the usable one of highest priority.

    CUDA: ``triton`` when it imports, else ``dense`` (the one fallback without host syncs).
    CPU: ``vllm_cpu`` where vLLM's CPU build imports (it runs grape's ``cpu`` where vLLM's
    kernel is slower), else ``cpu``. Other devices: ``dense``.
    """
    device = torch.device(device)
    best = _best([b for (kind, _), b in _BACKENDS.items() if kind == "experts"], device)
    if best is None:
        raise ValueError(f"no experts backend can run on {device}: {backend_status(device)}")
    return best.name


def resolve_backend(backend: str, device: torch.device | str) -> Backend:
    """The experts backend ``backend`` names (``"auto"``: chosen by device), checked to run on ``device``."""
    device = torch.device(device)
    resolved = get_backend(select_backend(device) if backend == "auto" else backend)
    ok, reason = resolved.usable(device)
    if not ok:
        raise ValueError(
            f"experts backend {resolved.name!r} cannot run on {device} in this process ({reason}); "
            f"usable there: {available_backends(device)}"
        )
    return resolved


def select_routing_backend(device: torch.device | str, backend: str = "auto") -> str | None:
    """Routing backend to pair with experts ``backend`` on ``device``; None keeps the model's router.

    The usable routing backend of highest priority whose ``pairs_with`` names the experts
    backend: beside ``triton`` the compiled CUDA op when it is built, else Triton's;
    ``reference`` pairs with the reference routing so a whole model can run on the oracle;
    ``cpu`` and ``dense`` pair with none.
    """
    device = torch.device(device)
    name = select_backend(device) if backend == "auto" else get_backend(backend).name
    candidates = [b for (kind, _), b in _BACKENDS.items() if kind == "routing" and name in b.pairs_with]
    best = _best(candidates, device)
    return None if best is None else best.name


def routing_function(name: str) -> RouteFn:
    """The ``fn(logits, spec) -> (ids, weights)`` function of routing backend ``name``."""
    return get_backend(name, "routing").load()


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
    ``(w_gate_up, w_down)`` pair; only the pair takes layout keywords (the other
    :class:`ExpertWeights` fields), the other two carry their own.
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
    return _LOADED[_resolve_loaded(backend, str(hidden.device))](hidden, weights, topk_ids, topk_weights)


@torch.compiler.assume_constant_result
def _resolve_loaded(backend: str, device: str) -> str:
    """:func:`resolve_backend`'s name, with the backend's function loaded into ``_LOADED``.

    Asked on every layer call, so answers are remembered per (backend, device) until the
    registry changes (the lookup cost a decode step of a small pruned model 5%). torch.compile
    runs this once while tracing (imports and registry lookups are not traceable) and keeps
    its answer for the compiled graph: the backend is chosen when a model is compiled.
    """
    name = _RESOLVED.get((backend, device))
    if name is None:
        resolved = resolve_backend(backend, device)
        _LOADED[resolved.name] = resolved.load()
        name = _RESOLVED[backend, device] = resolved.name
    return name
