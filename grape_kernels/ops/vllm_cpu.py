"""vLLM's fused CPU MoE kernel as an optional experts backend, ``vllm_cpu``, where it is faster.

vLLM's CPU build ships one fused kernel for a whole MoE layer (``torch.ops._C.cpu_fused_moe``,
weights in its own prepacked layout): no per-expert dispatch from Python, which is what bounds
grape's ``cpu`` backend on small experts. Measured side by side in one process on this
project's CPU (AVX-512 with bf16 dot products, no AMX, so vLLM's ``vec`` kernel), one thread,
against grape's ``cpu`` with its C++ loop (``benchmarks/RESULTS_vllm_cpu.md``, written by
``benchmarks/results.py`` in the serve venv):

- float32: vLLM's kernel is faster on small experts (the pruned Mixtral-pydoc layers: 1.27x
  grape's ``cpu`` at one token, 1.04-1.08x at 16-128) and on Mixtral-shaped ones at 1-16
  tokens (1.05-1.10x), and ties from 128 tokens on;
- bfloat16: grape's ``cpu`` is as fast or faster everywhere (1.0x at one token on
  Mixtral-shaped experts, 1.1x on small ones, 1.2-2.3x from 16 tokens on).

This backend runs vLLM's kernel in the cases it wins (:func:`vllm_wins`) and grape's ``cpu``
backend otherwise, so ``"auto"`` picks it wherever vLLM's CPU ops import. Its kernel covers
SiLU-gated experts in the concatenated (E, 2I, H) layout without biases and with H and I
multiples of 32; other layers (GPT-OSS's transposed, interleaved, biased clamped SwiGLU among
them) also run on grape's ``cpu``. vLLM's packed weights are kept in ``ops.cpu_prepack``'s
cache under its rules (validity checks, memory budget). A bfloat16 layer that serves both
kinds of call (a prefill on grape's path, decode steps on vLLM's) holds both packed forms, so
up to twice its weights in copies; ``prepacked_bytes()`` counts them and the budget caps them.
"""

from __future__ import annotations

import functools
import importlib

import torch

from grape_kernels.expert_weights import ExpertWeights
from grape_kernels.library import experts_op
from grape_kernels.ops.common import check_experts_inputs
from grape_kernels.ops.cpu import cpu_experts
from grape_kernels.ops.cpu_prepack import cached_copy

__all__ = ["vllm_cpu_experts", "vllm_cpu_ops", "vllm_isa", "vllm_wins"]

#: vLLM's CPU kernels need both hidden and intermediate sizes in multiples of this.
_ALIGNMENT = 32


@functools.cache
def vllm_cpu_ops():
    """``vllm._custom_ops`` where vLLM's CPU fused-MoE ops are loaded in this process, else None."""
    try:
        ops = importlib.import_module("vllm._custom_ops")
        torch.ops._C.cpu_fused_moe  # noqa: B018  (raises where the CPU ops are not built)
        torch.ops._C.prepack_moe_weight  # noqa: B018
    except Exception:  # vLLM's import can fail in many ways on a machine it was not built for
        return None
    return ops


def vllm_wins(dtype: torch.dtype) -> bool:
    """Whether vLLM's kernel measured faster than grape's ``cpu`` backend for this dtype: float32 only."""
    return dtype == torch.float32


def _vllm_runs(hidden: torch.Tensor, weights: ExpertWeights) -> bool:
    intermediate = weights.w_down.shape[-1]
    return (
        weights.activation == "silu" and not weights.transposed and not weights.interleaved
        and weights.gate_up_bias is None and weights.down_bias is None
        and hidden.shape[-1] % _ALIGNMENT == 0 and intermediate % _ALIGNMENT == 0
        and hidden.dtype in (torch.float32, torch.bfloat16) and weights.w_gate_up.dtype == hidden.dtype
    )


def vllm_isa(dtype: torch.dtype) -> str:
    """The ISA variant of vLLM's kernel for ``dtype`` here: ``amx`` for bfloat16 on AMX CPUs, else ``vec``."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "amx" if amx and dtype == torch.bfloat16 else "vec"


@experts_op("vllm_cpu")
def vllm_cpu_experts(
    hidden: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Routed-experts output (T, H): vLLM's fused kernel where it wins, grape's ``cpu`` elsewhere."""
    ops = vllm_cpu_ops()
    if ops is None or not _vllm_runs(hidden, weights) or hidden.shape[0] == 0 or not vllm_wins(hidden.dtype):
        return cpu_experts(hidden, weights, topk_ids, topk_weights)
    check_experts_inputs(hidden, weights, topk_ids, topk_weights)  # ids too: the kernel trusts them
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, topk_weights, weights.w_gate_up, weights.w_down)):
        raise RuntimeError("the vllm_cpu experts backend is inference-only; call it under torch.no_grad()")
    isa = vllm_isa(hidden.dtype)
    w13 = cached_copy(weights.w_gate_up, f"vllm-{isa}", lambda w: ops.cpu_prepack_moe_weight(w, isa))
    w2 = cached_copy(weights.w_down, f"vllm-{isa}", lambda w: ops.cpu_prepack_moe_weight(w, isa))
    if w13 is None or w2 is None:  # past the packing budget
        return cpu_experts(hidden, weights, topk_ids, topk_weights)
    out = torch.empty(hidden.shape, dtype=hidden.dtype)
    ops.cpu_fused_moe(
        out, hidden.contiguous(), w13, w2, None, None, topk_weights.float().contiguous(),
        topk_ids.to(torch.int32).contiguous(), "silu", isa, False,
    )
    return out
