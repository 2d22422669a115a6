"""Dense fallback: every expert on every token, masked by the routing weights.

This is what a MoE layer costs without sparse dispatch (E/k times the FLOPs of the routed
computation), and the shape of computation that needs no data-dependent control flow at all:
two batched GEMMs over the expert dimension and one contraction with a dense (T, E) routing
matrix. It is the baseline the sparse backends must beat, and a second, structurally different
implementation to cross-check them against.
"""

from __future__ import annotations

import torch

from grape_kernels.ops.common import check_experts_inputs, gated_activation

__all__ = ["dense_experts"]

#: Upper bound on the elements of the (E, tokens, 2I) intermediate of one chunk of tokens.
#: Keeps the dense path's extra memory near 128 MiB in float32 however large the batch is.
_MAX_INTERMEDIATE_ELEMENTS = 1 << 25


def dense_experts(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    activation: str = "silu",
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    transposed: bool = False,
    interleaved: bool = False,
) -> torch.Tensor:
    """Routed-experts output (T, H) computed densely; GEMMs in the input dtype, sum in float32."""
    problem = check_experts_inputs(
        hidden, w_gate_up, w_down, topk_ids, topk_weights,
        gate_up_bias=gate_up_bias, down_bias=down_bias, activation=activation, transposed=transposed,
    )
    tokens, experts = problem.tokens, problem.experts
    routing = torch.zeros(tokens, experts, dtype=torch.float32, device=hidden.device)
    routing.scatter_add_(1, topk_ids.long(), topk_weights.float())
    out = torch.empty(tokens, problem.hidden, dtype=hidden.dtype, device=hidden.device)
    w1 = w_gate_up if transposed else w_gate_up.transpose(1, 2)
    w2 = w_down if transposed else w_down.transpose(1, 2)
    chunk = max(1, _MAX_INTERMEDIATE_ELEMENTS // (experts * 2 * problem.intermediate))
    for start in range(0, tokens, chunk):
        x = hidden[start : start + chunk]
        gate_up = torch.bmm(x.unsqueeze(0).expand(experts, -1, -1), w1)
        if gate_up_bias is not None:
            gate_up += gate_up_bias.unsqueeze(1)
        h = gated_activation(
            gate_up, activation, interleaved=interleaved, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit
        )
        y = torch.bmm(h, w2)
        if down_bias is not None:
            y += down_bias.unsqueeze(1)
        mixed = torch.einsum("eth,te->th", y.float(), routing[start : start + chunk])
        out[start : start + chunk] = mixed
    return out
