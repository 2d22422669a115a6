"""The contract every experts backend shares: its signature, argument checks, the gated activations.

All backends (``reference``, ``dense``, ``cpu``, ``triton``) are :data:`ExpertsFn`\\ s::

    fn(hidden (T, H), weights: ExpertWeights, topk_ids (T, k), topk_weights (T, k)) -> (T, H)

(layouts in :mod:`grape_kernels.expert_weights`). Shapes, dtypes and devices are checked by
``grape_kernels.kernel_checks.check_experts_args``, the same function the GPU launchers call,
so every backend rejects the same bad call with the same ``ValueError`` before doing any work
(a mismatched shape deep inside a per-expert loop would otherwise surface as an opaque BLAS
error, or not at all for experts without tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from grape_kernels.expert_weights import ExpertWeights
from grape_kernels.kernel_checks import ExpertsProblem, check_experts_args

__all__ = [
    "ExpertsFn",
    "ExpertsProblem",
    "check_experts_inputs",
    "gated_activation",
    "ids_out_of_range",
    "split_gate_up",
]

#: Signature shared by every experts backend (see the module docstring).
ExpertsFn = Callable[[torch.Tensor, ExpertWeights, torch.Tensor, torch.Tensor], torch.Tensor]


def check_experts_inputs(
    hidden: torch.Tensor,
    weights: ExpertWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    check_ids: bool = True,
) -> ExpertsProblem:
    """Validate an experts call (``check_experts_args`` plus two checks it leaves out).

    Biases must share the hidden dtype (the PyTorch backends add them in place). Expert ids
    must lie in [0, E): on the CPU that check is one cheap reduction and turns the classic
    ragged-model bug (a router of 8 experts driving a layer pruned to 4) into an error instead
    of silently wrong output. On a GPU it would force a host sync per layer, so there the
    kernels' rule applies instead (ids outside [0, E) contribute nothing). A caller that sees
    the ids anyway passes ``check_ids=False`` and raises :func:`ids_out_of_range` itself.

    Raises:
        ValueError: naming the offending argument.
    """
    problem = check_experts_args(hidden, weights, topk_ids, topk_weights)
    for name, bias in (("gate_up_bias", weights.gate_up_bias), ("down_bias", weights.down_bias)):
        if bias is not None and bias.dtype != hidden.dtype:
            raise ValueError(f"{name} is {bias.dtype} but hidden is {hidden.dtype}")
    if check_ids and hidden.device.type == "cpu" and topk_ids.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(topk_ids))
        if low < 0 or high >= problem.experts:
            raise ids_out_of_range(problem.experts, low, high)
    return problem


def ids_out_of_range(experts: int, low: int, high: int) -> ValueError:
    """The error for expert ids outside [0, E), with the range that was found."""
    return ValueError(
        f"topk_ids must lie in [0, {experts}) for a layer with E={experts} experts, got values in [{low}, {high}]"
    )


def split_gate_up(gate_up: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the gate and up halves of a (..., 2I) projection output.

    Concatenated layouts store all gate columns first; GPT-OSS interleaves them
    (gate0, up0, gate1, up1, ...).
    """
    if interleaved:
        return gate_up[..., 0::2], gate_up[..., 1::2]
    half = gate_up.shape[-1] // 2
    return gate_up[..., :half], gate_up[..., half:]


def gated_activation(gate_up: torch.Tensor, weights: ExpertWeights) -> torch.Tensor:
    """(..., I) activation of a (..., 2I) gate/up projection, out of place.

    This is the straightforward formulation used by the oracle and the dense backend; the
    CPU fast path has its own in-place version of the same arithmetic.
    """
    gate, up = split_gate_up(gate_up, weights.interleaved)
    if weights.activation == "silu":
        return F.silu(gate) * up
    limit = weights.swiglu_limit
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * weights.swiglu_alpha))
