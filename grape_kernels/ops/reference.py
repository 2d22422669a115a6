"""The oracle: an obvious per-expert loop, and the routing rules written out in plain PyTorch.

Everything here favours being evidently right over being fast: each expert gathers its tokens
with a boolean mask, runs its MLP in float32 whatever the input dtype and adds the weighted
result into a float32 accumulator. Other backends are checked against it, and
``swap_moe_blocks(model, backend="reference")`` runs a whole model through it.
"""

from __future__ import annotations

import torch

from grape_kernels.expert_weights import ExpertWeights
from grape_kernels.kernel_checks import check_route_args
from grape_kernels.library import experts_op, routing_op
from grape_kernels.ops.common import check_experts_inputs, gated_activation
from grape_kernels.routing import RoutingSpec, route

__all__ = ["reference_experts", "reference_route_topk"]


@experts_op("reference")
def reference_experts(
    hidden: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Routed-experts output (T, H), one expert at a time, computed and accumulated in float32."""
    problem = check_experts_inputs(hidden, weights, topk_ids, topk_weights)
    compute = torch.float32
    out = torch.zeros(problem.tokens, problem.hidden, dtype=compute, device=hidden.device)
    for expert in range(problem.experts):
        token_idx, slot = (topk_ids == expert).nonzero(as_tuple=True)
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx].to(compute)
        w1 = weights.w_gate_up[expert].to(compute)
        gate_up = x @ w1 if weights.transposed else x @ w1.T
        if weights.gate_up_bias is not None:
            gate_up = gate_up + weights.gate_up_bias[expert].to(compute)
        h = gated_activation(gate_up, weights)
        w2 = weights.w_down[expert].to(compute)
        y = h @ w2 if weights.transposed else h @ w2.T
        if weights.down_bias is not None:
            y = y + weights.down_bias[expert].to(compute)
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot].to(compute).unsqueeze(1))
    return out.to(hidden.dtype)


@routing_op("reference")
def reference_route_topk(logits: torch.Tensor, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids (T, k) int32 and weights (T, k) float32 from router logits (T, E).

    The routing backend contract of ``grape_kernels.triton.route_topk`` and
    ``grape_kernels.cuda_ops.route_topk``, computed by :func:`grape_kernels.routing.route` (the
    architectures' routing rules in plain PyTorch) after the same argument checks, so the
    oracle refuses exactly what the kernels refuse.
    """
    check_route_args(logits, spec)
    ids, weights = route(logits, spec)
    return ids.to(torch.int32), weights
