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

The grape kernels are inference kernels. When autograd is recording through the experts (a
forward outside ``torch.no_grad()`` on a model whose parameters require grad), the "grape"
implementation hands the call to transformers' differentiable ``grouped_mm`` instead of
failing, and says so once.
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
from grape_kernels.expert_weights import ExpertWeights
from grape_kernels.routing import RoutingSpec, kernel_mode

__all__ = ["EXPERTS_IMPLEMENTATION", "grape_experts_forward", "register", "swap_moe_blocks"]

logger = logging.getLogger(__name__)

#: Name under which grape registers in transformers' ``ExpertsInterface``.
EXPERTS_IMPLEMENTATION = "grape"

_warned_autograd = False


def _needs_autograd(experts: nn.Module, hidden: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether autograd records this call (checked per layer call, so without ``parameters()``)."""
    if not torch.is_grad_enabled():
        return False
    tensors = [hidden, weights, experts.gate_up_proj, experts.down_proj]
    if getattr(experts, "has_bias", False):
        tensors += [experts.gate_up_proj_bias, experts.down_proj_bias]
    return any(t.requires_grad for t in tensors)


def _run(experts: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, backend: str):
    global _warned_autograd
    if _needs_autograd(experts, hidden, weights):
        if not _warned_autograd:
            logger.warning(
                "grape experts kernels are inference-only and autograd is recording; using "
                "transformers' grouped_mm for these calls (run under torch.no_grad() or "
                "torch.inference_mode() to use grape)"
            )
            _warned_autograd = True
        return grouped_mm_experts_forward(experts, hidden, ids, weights)
    return experts_forward(experts, hidden, ids, weights, backend=backend)


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
    implements (DeepSeek-V2's ``group_limited_greedy``: groups scored by their best *softmax*
    score, see ``grape_kernels.routing.kernel_mode``) keeps the router's own forward.
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

    Raises:
        ValueError: unknown backend, a model without transformers experts modules, or an
            experts module whose math grape does not implement (checked before any change).
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
        ExpertWeights.from_module(experts)
        if backend != "auto":
            resolve_backend(backend, experts.gate_up_proj.device)
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
