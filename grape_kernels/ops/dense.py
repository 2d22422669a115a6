"""Dense fallback: every expert on every token, masked by the routing weights.

This is what a MoE layer costs without sparse dispatch (E/k times the FLOPs of the routed
computation), and the shape of computation that needs no data-dependent control flow at all:
two batched GEMMs over the expert dimension and one contraction with a dense (T, E) routing
matrix. It is the baseline the sparse backends must beat, and a second, structurally different
implementation to cross-check them against.
"""

from __future__ import annotations

import torch

from grape_kernels.expert_weights import ExpertWeights
from grape_kernels.library import experts_op
from grape_kernels.ops.common import check_experts_inputs, gated_activation

__all__ = ["dense_experts"]

#: Upper bound on the elements of the (E, tokens, 2I) intermediate of one chunk of tokens.
#: Keeps the dense path's extra memory near 128 MiB in float32 however large the batch is.
_MAX_INTERMEDIATE_ELEMENTS = 1 << 25


@experts_op("dense")
def dense_experts(
    hidden: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Routed-experts output (T, H) computed densely; GEMMs in the input dtype, sum in float32."""
    problem = check_experts_inputs(hidden, weights, topk_ids, topk_weights)
    tokens, experts = problem.tokens, problem.experts
    routing = torch.zeros(tokens, experts, dtype=torch.float32, device=hidden.device)
    routing.scatter_add_(1, topk_ids.long(), topk_weights.float())
    out = torch.empty(tokens, problem.hidden, dtype=hidden.dtype, device=hidden.device)
    w1 = weights.w_gate_up if weights.transposed else weights.w_gate_up.transpose(1, 2)
    w2 = weights.w_down if weights.transposed else weights.w_down.transpose(1, 2)
    chunk = max(1, _MAX_INTERMEDIATE_ELEMENTS // (experts * 2 * problem.intermediate))
    for start in range(0, tokens, chunk):
        x = hidden[start : start + chunk]
        gate_up = torch.bmm(x.unsqueeze(0).expand(experts, -1, -1), w1)
        if weights.gate_up_bias is not None:
            gate_up += weights.gate_up_bias.unsqueeze(1)
        y = torch.bmm(gated_activation(gate_up, weights), w2)
        if weights.down_bias is not None:
            y += weights.down_bias.unsqueeze(1)
        out[start : start + chunk] = torch.einsum("eth,te->th", y.float(), routing[start : start + chunk])
    return out
