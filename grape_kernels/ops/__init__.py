"""PyTorch implementations of a routed-experts layer: the oracle, the dense fallback, the CPU path.

All share the ``fused_experts`` signature documented in :mod:`grape_kernels.ops.common`.
"""

from grape_kernels.ops.common import ACTIVATIONS, ExpertsFn, check_experts_inputs, gated_activation
from grape_kernels.ops.cpu import cpu_experts
from grape_kernels.ops.dense import dense_experts
from grape_kernels.ops.reference import reference_experts, reference_route_topk

__all__ = [
    "ACTIVATIONS",
    "ExpertsFn",
    "check_experts_inputs",
    "cpu_experts",
    "dense_experts",
    "gated_activation",
    "reference_experts",
    "reference_route_topk",
]
