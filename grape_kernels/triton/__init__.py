"""Triton kernels for ragged MoE layers: routing, align-block-size and the fused grouped GEMM.

Importing this package imports Triton; callers that must work without it (CPU-only installs)
should import it lazily and fall back to another backend on ``ImportError``. Every kernel
takes the layer's expert count ``E`` as a runtime argument, so one compilation serves all
layers of a pruned model whose layers keep different numbers of experts.
"""

from grape_kernels.triton.align import align_block_size
from grape_kernels.triton.grouped_gemm import fused_experts
from grape_kernels.triton.routing import route_topk
from grape_kernels.triton.tuning import KernelConfig

__all__ = ["route_topk", "align_block_size", "fused_experts", "KernelConfig"]
