"""The oracle: an obvious per-expert loop, and the routing rules written out in plain PyTorch.

Everything here favours being evidently right over being fast: each expert gathers its tokens
with a boolean mask, runs its MLP in float32 whatever the input dtype and adds the weighted
result into a float32 accumulator. Other backends are checked against it, and
``swap_moe_blocks(model, backend="reference")`` runs a whole model through it.
"""

from __future__ import annotations

import torch

from grape_kernels.expert_weights import ExpertWeights
from grape_kernels.ops.common import check_experts_inputs, gated_activation
from grape_kernels.routing import ROUTING_MODES, RoutingSpec, route

__all__ = ["reference_experts", "reference_route_topk"]


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


def reference_route_topk(
    logits: torch.Tensor,
    top_k: int,
    *,
    mode: str = "softmax_topk",
    renormalize: bool = False,
    scaling: float = 1.0,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids (T, k) int32 and weights (T, k) float32 from router logits (T, E).

    Same signature and semantics as ``grape_kernels.triton.route_topk``:

    - ``softmax_topk`` (Mixtral, Qwen, OLMoE, DeepSeek-V2 greedy): softmax over all experts,
      keep the k largest, optionally renormalise them to sum to one.
    - ``topk_softmax`` (GPT-OSS): keep the k largest logits, softmax over those k.
    - ``sigmoid_group`` (DeepSeek-V3): sigmoid scores; the *choice* adds ``correction_bias``
      and is restricted to the ``topk_group`` best of ``n_group`` contiguous groups (group
      score = sum of its two best biased scores); weights are the unbiased scores,
      renormalised with a 1e-20 guard when asked.

    ``scaling`` multiplies the final weights in every mode.
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"mode must be one of {ROUTING_MODES}, got {mode!r}")
    if logits.dim() != 2:
        raise ValueError(f"router logits must be (tokens, experts), got {tuple(logits.shape)}")
    experts = logits.shape[1]
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts E={experts}")
    if mode != "sigmoid_group" and (n_group != 1 or correction_bias is not None):
        raise ValueError(f"n_group / correction_bias apply to mode='sigmoid_group' only, not {mode!r}")
    if mode == "sigmoid_group":
        if experts % n_group != 0:
            raise ValueError(f"E={experts} experts do not split into n_group={n_group} equal groups")
        per_group = experts // n_group
        if not 1 <= topk_group <= n_group or topk_group * per_group < top_k:
            raise ValueError(
                f"topk_group={topk_group} of n_group={n_group} groups ({per_group} experts each) "
                f"cannot supply top_k={top_k} experts"
            )
    # The architectures' routing semantics live in one place, grape_kernels.routing (plain PyTorch).
    spec = RoutingSpec(
        top_k=top_k,
        score_fn="sigmoid" if mode == "sigmoid_group" else "softmax",
        topk_before_softmax=mode == "topk_softmax",
        renormalize=renormalize and mode != "topk_softmax",
        scaling=scaling,
        n_group=n_group,
        topk_group=topk_group,
        group_score="top2_sum",
        correction_bias=correction_bias,
    )
    ids, weights = route(logits, spec)
    return ids.to(torch.int32), weights
