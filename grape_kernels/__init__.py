"""grape_kernels: execute ragged Mixture-of-Experts layers fast (Triton, CUDA, CPU).

Importing the package registers the ``"grape"`` experts implementation with transformers, so
``from_pretrained(..., experts_implementation="grape")`` works right after ``import grape_kernels``.
Triton and the CUDA extension are imported lazily, only when a backend that needs them runs.
"""

from grape_kernels.backends import (
    Backend,
    available_backends,
    backend_names,
    backend_status,
    experts_forward,
    get_backend,
    register_backend,
    routing_function,
    select_backend,
    select_routing_backend,
)
from grape_kernels.expert_weights import ExpertWeights
from grape_kernels.integration import EXPERTS_IMPLEMENTATION, grape_experts_forward, register, swap_moe_blocks
from grape_kernels.ops import cpu_experts, dense_experts, reference_experts, reference_route_topk

register()

__all__ = [
    "Backend",
    "EXPERTS_IMPLEMENTATION",
    "ExpertWeights",
    "available_backends",
    "backend_names",
    "backend_status",
    "cpu_experts",
    "dense_experts",
    "experts_forward",
    "get_backend",
    "grape_experts_forward",
    "reference_experts",
    "reference_route_topk",
    "register_backend",
    "routing_function",
    "select_backend",
    "select_routing_backend",
    "swap_moe_blocks",
]
