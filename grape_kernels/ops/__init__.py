"""PyTorch implementations of a routed-experts layer: the oracle, the dense fallback, the CPU path.

All are :data:`~grape_kernels.ops.common.ExpertsFn`\\ s: ``fn(hidden, weights, topk_ids, topk_weights)``.
"""

from grape_kernels.ops.common import ExpertsFn, check_experts_inputs, gated_activation
from grape_kernels.ops.cpu import cpu_experts
from grape_kernels.ops.dense import dense_experts
from grape_kernels.ops.reference import reference_experts, reference_route_topk

__all__ = [
    "ExpertsFn",
    "check_experts_inputs",
    "cpu_experts",
    "dense_experts",
    "gated_activation",
    "reference_experts",
    "reference_route_topk",
]
