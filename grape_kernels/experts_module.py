"""What one routed expert of a transformers experts module computes, as plain PyTorch.

Calibration statistics, MoE-Pruner's input statistics and distillation all evaluate single
experts; they call these functions so that they see exactly the model's math, whatever layout
the module stores (flags set by transformers' ``use_experts_implementation``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["expert_activation", "expert_forward"]


def expert_activation(
    experts: nn.Module, index: int, x: torch.Tensor, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Input of expert ``index``'s down projection on tokens ``x`` (T, H): act(gate) * up.

    Generic over the layouts transformers uses (flags set by ``use_experts_implementation``):
    concatenated [gate; up] or interleaved gate/up columns, (out, in) or transposed (in, out)
    storage, optional biases, and the architecture's own ``_apply_gate`` (GPT-OSS's clamped
    SwiGLU). ``dtype`` computes in that type (e.g. float32 statistics of a bf16 model).
    """
    w_gate_up = experts.gate_up_proj[index]
    if dtype is not None:
        w_gate_up, x = w_gate_up.to(dtype), x.to(dtype)
    h = x @ w_gate_up if getattr(experts, "is_transposed", False) else nn.functional.linear(x, w_gate_up)
    if getattr(experts, "has_bias", False):
        h = h + experts.gate_up_proj_bias[index].to(h.dtype)
    return experts._apply_gate(h)


def expert_forward(experts: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """Output of routed expert ``index`` on tokens ``x`` (T, H), unweighted.

    Statistics and distillation both call this, so they see exactly the model's math.
    """
    h = expert_activation(experts, index, x)
    w_down = experts.down_proj[index]
    out = h @ w_down if getattr(experts, "is_transposed", False) else nn.functional.linear(h, w_down)
    if getattr(experts, "has_bias", False):
        out = out + experts.down_proj_bias[index]
    return out
