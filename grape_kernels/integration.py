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

import functools
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

from grape_kernels.backends import (
    RouteFn,
    experts_forward,
    get_backend,
    resolve_backend,
    routing_function,
    select_routing_backend,
)
from grape_kernels.expert_weights import ExpertWeights

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
@dataclass(frozen=True)
class _RouterRule:
    """How one transformers router class maps onto ``route_topk``.

    Attributes:
        mode: ``route_topk`` mode.
        float32_logits: the router computes its logits in float32 (DeepSeek) rather than in
            the model dtype.
        weights_in_logits_dtype: the router casts its weights back to the logits dtype
            (Qwen, OLMoE, GPT-OSS) instead of returning float32 (Mixtral, DeepSeek).
        kwargs: the remaining ``route_topk`` arguments, read from the router module per call
            (so they follow the module across devices and edits).
    """

    mode: str
    float32_logits: bool
    weights_in_logits_dtype: bool
    kwargs: Callable[[nn.Module], dict]


def _softmax_kwargs(router: nn.Module) -> dict:
    return {"renormalize": bool(router.norm_topk_prob)}


_ROUTER_RULES: dict[str, _RouterRule] = {
    "MixtralTopKRouter": _RouterRule("softmax_topk", False, False, lambda r: {"renormalize": True}),
    "Qwen2MoeTopKRouter": _RouterRule("softmax_topk", False, True, _softmax_kwargs),
    "Qwen3MoeTopKRouter": _RouterRule("softmax_topk", False, True, _softmax_kwargs),
    "OlmoeTopKRouter": _RouterRule("softmax_topk", False, True, _softmax_kwargs),
    "DeepseekV3TopkRouter": _RouterRule(
        "sigmoid_group", True, False,
        lambda r: {
            "renormalize": bool(r.norm_topk_prob),
            "scaling": float(r.routed_scaling_factor),
            "correction_bias": r.e_score_correction_bias,
            "n_group": int(r.num_group),
            "topk_group": int(r.topk_group),
        },
    ),
    # Only greedy DeepSeek-V2 routing maps onto route_topk (see _router_rule).
    "DeepseekV2TopkRouter": _RouterRule(
        "softmax_topk", True, False, lambda r: {"scaling": float(r.routed_scaling_factor)}
    ),
    "GptOssTopKRouter": _RouterRule("topk_softmax", False, True, lambda r: {}),
}


def _router_rule(router: nn.Module) -> _RouterRule | None:
    """The rule for ``router``, or None when no routing kernel reproduces it.

    DeepSeek-V2's ``group_limited_greedy`` scores groups by their best *softmax* score, a rule
    ``route_topk`` does not offer (its group-limited mode is DeepSeek-V3's sigmoid rule), so
    such routers keep their own forward.
    """
    rule = _ROUTER_RULES.get(type(router).__name__)
    if rule is not None and type(router).__name__ == "DeepseekV2TopkRouter" and router.topk_method != "greedy":
        return None
    return rule


def _routed_forward(self: nn.Module, hidden_states: torch.Tensor, *, rule: _RouterRule, route: RouteFn):
    """Router forward through a ``route_topk`` kernel; same outputs as the transformers router."""
    hidden = hidden_states.reshape(-1, self.weight.shape[1])
    if rule.float32_logits:
        logits = F.linear(hidden.float(), self.weight.float())
    else:
        logits = F.linear(hidden, self.weight, getattr(self, "bias", None))
    ids, weights = route(logits, self.top_k, mode=rule.mode, **rule.kwargs(self))
    if rule.weights_in_logits_dtype:
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
    with any ``route_topk``-compatible function) and the router's rule maps onto it; other
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
    for block_name, experts in blocks.items():
        experts.grape_backend = backend
        experts.forward = types.MethodType(_swapped_experts_forward, experts)
        for router in model.get_submodule(block_name).children():
            rule = _router_rule(router)
            if rule is None:
                continue
            route = route_fn
            if route is None:
                routing_backend = select_routing_backend(router.weight.device, backend)
                if routing_backend is None:
                    continue
                route = routing_function(routing_backend)
            router.forward = types.MethodType(functools.partial(_routed_forward, rule=rule, route=route), router)
    return model
