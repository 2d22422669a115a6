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

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

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


def _triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or anywhere under the interpreter (how this project tests them)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        importlib.import_module("grape_kernels.triton")
    except ImportError:
        return False
    return True


def _cuda_routing_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        cuda_ops = importlib.import_module("grape_kernels.cuda_ops")
    except ImportError:
        return False
    return bool(cuda_ops.available()) and hasattr(cuda_ops, "route_topk")


@dataclass(frozen=True)
class Backend:
    """One experts implementation.

    Attributes:
        name: registry key (``backend=`` argument everywhere).
        load: returns the experts function; called on first use so optional kernels import lazily.
        usable: whether the backend can run on a device in this process.
        description: one line for error messages and benchmark tables.
    """

    name: str
    load: Callable[[], ExpertsFn]
    usable: Callable[[torch.device], bool]
    description: str


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _BACKENDS[backend.name] = backend


def _load(module: str, attr: str) -> Callable[[], ExpertsFn]:
    return lambda: getattr(importlib.import_module(module), attr)


register_backend(Backend(
    "triton", _load("grape_kernels.triton", "fused_experts"), _triton_usable,
    "Triton fused grouped GEMM (GPU)",
))
register_backend(Backend(
    "cpu", _load("grape_kernels.ops.cpu", "cpu_experts"), lambda d: d.type == "cpu",
    "sorted per-expert GEMMs, PyTorch on the CPU",
))
register_backend(Backend(
    "dense", _load("grape_kernels.ops.dense", "dense_experts"), lambda d: True,
    "every expert on every token, masked by routing",
))
register_backend(Backend(
    "reference", _load("grape_kernels.ops.reference", "reference_experts"), lambda d: True,
    "per-expert loop in float32 (the oracle)",
))


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
_ROUTING: dict[str, tuple[Callable[[], RouteFn], Callable[[torch.device], bool]]] = {
    "cuda": (lambda: importlib.import_module("grape_kernels.cuda_ops").route_topk, _cuda_routing_usable),
    "triton": (lambda: importlib.import_module("grape_kernels.triton").route_topk, _triton_usable),
    "reference": (lambda: importlib.import_module("grape_kernels.ops.reference").reference_route_topk,
                  lambda d: True),
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
    return _ROUTING[name][0]()


# ---- weights -----------------------------------------------------------------------------
def _uses_default_gate(experts: nn.Module) -> bool:
    """Whether the module gates with transformers' default ``act_fn(gate) * up``.

    ``use_experts_implementation`` installs ``_default_apply_gate`` on classes without their
    own; it is recognised by name and module so this file need not import transformers.
    """
    gate = getattr(type(experts), "_apply_gate", None)
    return (getattr(gate, "__name__", None), getattr(gate, "__module__", None)) == (
        "_default_apply_gate",
        "transformers.integrations.moe",
    )


@dataclass(frozen=True)
class ExpertWeights:
    """The tensors and layout flags of one experts layer, as ``fused_experts`` takes them."""

    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    transposed: bool = False
    interleaved: bool = False

    def layout_kwargs(self) -> dict:
        """Everything but the two weight tensors, as keyword arguments of an experts backend."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("w_gate_up", "w_down")}

    @classmethod
    def from_module(cls, experts: nn.Module) -> ExpertWeights:
        """Read a transformers experts module (one decorated by ``use_experts_implementation``).

        The flags the decorator sets say how the weights are stored; the gated activation is
        identified from the module (GPT-OSS's clamped SwiGLU, or the default ``act_fn(gate) *
        up`` with SiLU). Anything else raises rather than being computed with the wrong math.
        """
        name = type(experts).__name__
        if not getattr(experts, "has_gate", True) or not hasattr(experts, "gate_up_proj"):
            raise ValueError(f"{name} has no fused gate_up_proj; grape kernels need gated (SwiGLU) experts")
        if getattr(experts, "has_post_expert_norm", False):
            raise ValueError(f"{name} applies a post-expert norm, which grape kernels do not implement")
        if getattr(experts, "_is_expert_parallel", False):
            raise ValueError(f"{name} is expert-parallel (sharded ids); grape kernels need all experts local")
        if any(c.__name__ == "GptOssExperts" for c in type(experts).__mro__):
            activation, alpha, limit = "gpt_oss", float(experts.alpha), float(experts.limit)
        elif not _uses_default_gate(experts):
            raise ValueError(f"{name} defines its own _apply_gate, which grape kernels do not implement")
        elif isinstance(experts.act_fn, nn.SiLU) or type(experts.act_fn).__name__ == "SiLUActivation":
            activation, alpha, limit = "silu", 1.702, 7.0
        else:
            raise ValueError(
                f"{name} uses activation {type(experts.act_fn).__name__}; grape kernels implement "
                "SiLU-gated experts and GPT-OSS's clamped SwiGLU"
            )
        has_bias = bool(getattr(experts, "has_bias", False))
        return cls(
            w_gate_up=experts.gate_up_proj,
            w_down=experts.down_proj,
            gate_up_bias=experts.gate_up_proj_bias if has_bias else None,
            down_bias=experts.down_proj_bias if has_bias else None,
            activation=activation,
            swiglu_alpha=alpha,
            swiglu_limit=limit,
            transposed=bool(getattr(experts, "is_transposed", False)),
            interleaved=not getattr(experts, "is_concatenated", True),
        )


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
    if isinstance(module_or_weights, tuple):
        w_gate_up, w_down = module_or_weights
        weights = ExpertWeights(w_gate_up, w_down, **layout)
    else:
        if layout:
            raise TypeError(f"layout keywords {sorted(layout)} only apply to a (w_gate_up, w_down) pair")
        weights = (
            module_or_weights
            if isinstance(module_or_weights, ExpertWeights)
            else ExpertWeights.from_module(module_or_weights)
        )
    fn = resolve_backend(backend, hidden.device).load()
    return fn(hidden, weights.w_gate_up, weights.w_down, topk_ids, topk_weights, **weights.layout_kwargs())
