"""Plugging grape kernels into transformers models.

Two ways in:

1. ``experts_implementation="grape"``. Importing ``grape_kernels`` registers
   :func:`grape_experts_forward` in transformers' ``ExpertsInterface``, so
   ``AutoModelForCausalLM.from_pretrained(path, experts_implementation="grape")`` and
   ``model.set_experts_implementation("grape")`` route every experts module through
   :func:`grape_kernels.backends.experts_forward` with the backend chosen by device. The
   expert count is read from each module's weights on every call, so ragged (pruned) models
   with a different E per layer need nothing special.
2. :func:`swap_moe_blocks` on an already loaded model: pins a backend per experts module
   (whatever the model's ``experts_implementation``) and, where that backend has a fused
   routing kernel, replaces the routers too.

Both compile with ``torch.compile(model, fullgraph=True)``: the kernels are custom ops
(``grape_kernels.library``) and the backend is resolved once while tracing.

Two cases run transformers' own code instead, whole, with a one-time notice (never an error):

- autograd is recording (a forward outside ``torch.no_grad()`` where the hidden states or the
  layer's parameters require grad): the grape kernels are inference kernels, so experts run
  transformers' differentiable ``grouped_mm`` and swapped routers their own forward; every
  parameter then gets exactly the gradient it gets without grape;
- an experts module whose math the kernels do not fuse (an activation other than SiLU or
  GPT-OSS's clamped SwiGLU, a custom gate, a post-expert norm, expert parallelism: see
  ``grape_kernels.expert_weights.unsupported_reason``): its calls run ``grouped_mm``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

from grape_kernels.architectures import MoEAdapter, UnsupportedModelError, get_adapter
from grape_kernels.backends import (
    RouteFn,
    experts_forward,
    get_backend,
    resolve_backend,
    routing_function,
    select_routing_backend,
)
from grape_kernels.expert_weights import ExpertWeights, unsupported_reason
from grape_kernels.routing import RoutingSpec, kernel_mode

__all__ = ["EXPERTS_IMPLEMENTATION", "grape_experts_forward", "register", "swap_moe_blocks"]

logger = logging.getLogger(__name__)

#: Name under which grape registers in transformers' ``ExpertsInterface``.
EXPERTS_IMPLEMENTATION = "grape"

_noticed: set[str] = set()


def _notice_once(message: str) -> None:
    """Log ``message`` the first time it comes up (never while torch.compile traces)."""
    if torch.compiler.is_compiling() or message in _noticed:
        return
    _noticed.add(message)
    logger.warning(message)


def _records_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors`` (checked per call, so without ``parameters()``)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fallback_reason(experts: nn.Module, hidden: torch.Tensor, weights: torch.Tensor) -> str | None:
    """Why this call must run transformers' own path, or None when grape's kernels can run it."""
    reason = unsupported_reason(experts)
    if reason is not None:
        return reason
    biases = (experts.gate_up_proj_bias, experts.down_proj_bias) if getattr(experts, "has_bias", False) else ()
    if _records_autograd(hidden, weights, experts.gate_up_proj, experts.down_proj, *biases):
        return "autograd is recording and grape's experts kernels are inference-only"
    return None


def _run(experts: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, backend: str):
    reason = _fallback_reason(experts, hidden, weights)
    if reason is not None:
        _notice_once(
            f"{reason}; these calls run transformers' grouped_mm experts instead (grape's kernels "
            "run under torch.no_grad() / torch.inference_mode() on SiLU or GPT-OSS experts)"
        )
        return grouped_mm_experts_forward(experts, hidden, ids, weights)
    return experts_forward(ExpertWeights.read_supported(experts), hidden, ids, weights, backend=backend)


def grape_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers ``ExpertsInterface`` entry: (T, H) hidden, (T, k) ids and weights -> (T, H)."""
    return _run(self, hidden_states, top_k_index, top_k_weights, "auto")


def register() -> None:
    """Register "grape" in transformers' ``ExpertsInterface`` (done on ``import grape_kernels``)."""
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, grape_experts_forward)


# ---- swapping modules of a loaded model --------------------------------------------------
def _router_spec(adapter: MoEAdapter, config, router: nn.Module) -> RoutingSpec | None:
    """The routing rule a kernel must reproduce for ``router``, or None to keep its own forward.

    The rule is the architecture record's (``adapter.routing_spec``); a router of another
    class than the record names (a changed upstream class) or a rule no routing kernel
    implements (``grape_kernels.routing.kernel_mode`` refuses it) keeps the router's own forward.
    """
    if type(router).__name__ != adapter.router_class:
        return None
    spec = adapter.routing_spec(config)
    try:
        kernel_mode(spec)
    except ValueError:
        return None
    return spec


def _routed_forward(self: nn.Module, hidden_states: torch.Tensor, *, adapter: MoEAdapter, spec: RoutingSpec,
                    route: RouteFn):
    """Router forward through a routing kernel; same outputs as the transformers router.

    The correction bias is read from the router on every call, so it follows the module
    across devices and edits.
    """
    if _records_autograd(hidden_states, self.weight):
        _notice_once(
            "autograd is recording and grape's routing kernels are inference-only; swapped routers run "
            "their own (transformers') forward for these calls"
        )
        return type(self).forward(self, hidden_states)
    hidden = hidden_states.reshape(-1, self.weight.shape[1])
    logits = adapter.logits_of_router(self, hidden)
    bias = getattr(self, "e_score_correction_bias", None)
    ids, weights = route(logits, spec if bias is None else dataclasses.replace(spec, correction_bias=bias))
    if adapter.router_weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    return logits, weights, ids.long()


def _is_experts_module(module: nn.Module) -> bool:
    """A transformers experts module: fused 3-D expert weights behind ``use_experts_implementation``."""
    weight = getattr(module, "gate_up_proj", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 3 and hasattr(module, "is_transposed")


def _swapped_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    return _run(self, hidden_states, top_k_index, top_k_weights, self.grape_backend)


def swap_moe_blocks(model: nn.Module, backend: str = "auto", *, route_fn: RouteFn | None = None) -> nn.Module:
    """Run every MoE block of a loaded model on grape kernels; returns the same model.

    Each experts module gets a forward pinned to ``backend`` (``"auto"`` picks by the device of
    each call's tensors; or ``"cpu"``, ``"dense"``, ``"reference"``, ``"triton"``), regardless
    of the model's ``experts_implementation``. Routers are replaced by a fused routing kernel
    where the backend has one (``select_routing_backend``; ``route_fn`` overrides the choice
    with any ``route_fn(logits, spec) -> (ids, weights)`` function) and the architecture's
    routing rule (its record in ``grape_kernels.architectures``) maps onto a kernel; other
    routers keep their own forward.

    Experts modules whose math the kernels do not fuse keep running transformers'
    ``grouped_mm`` (said once, here); their routers are still swapped.

    Raises:
        ValueError: unknown backend, a backend that cannot run where the model is, or a model
            without transformers experts modules (checked before any change).
    """
    if backend != "auto":
        get_backend(backend)
    blocks = {
        name.rpartition(".")[0]: module for name, module in model.named_modules() if _is_experts_module(module)
    }
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no transformers experts modules (3-D gate_up_proj behind "
            "use_experts_implementation)"
        )
    for experts in blocks.values():
        if backend != "auto":
            resolve_backend(backend, experts.gate_up_proj.device)
    for reason in sorted({r for r in map(unsupported_reason, blocks.values()) if r is not None}):
        _notice_once(f"{reason}; those experts run transformers' grouped_mm instead of grape's kernels")
    try:
        adapter = get_adapter(model.config)
    except UnsupportedModelError:
        adapter = None  # an architecture without a record: experts are swapped, routers kept
    for block_name, experts in blocks.items():
        experts.grape_backend = backend
        experts.forward = types.MethodType(_swapped_experts_forward, experts)
        router = None if adapter is None else getattr(model.get_submodule(block_name), adapter.router_attr, None)
        spec = None if router is None else _router_spec(adapter, model.config, router)
        if spec is None:
            continue
        route = route_fn
        if route is None:
            routing_backend = select_routing_backend(router.weight.device, backend)
            if routing_backend is None:
                continue
            route = routing_function(routing_backend)
        forward = functools.partial(_routed_forward, adapter=adapter, spec=spec, route=route)
        router.forward = types.MethodType(forward, router)
    return model
