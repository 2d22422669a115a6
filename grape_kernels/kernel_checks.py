"""Input validation shared by every accelerated MoE backend (Triton and the CUDA extension).

A GPU kernel that is handed a mismatched shape, dtype or device does not fail politely: it
reads out of bounds, or silently computes garbage. So every public launcher calls one of these
checks first and turns a bad call into a ``ValueError`` that names the argument. The module is
plain PyTorch (no Triton import) so the CUDA wrappers can use it on machines without Triton.

Nothing here looks at tensor *values* (e.g. whether every expert id is below ``E``): that would
need a device-to-host sync on every call. Out-of-range ids are instead defined to be dropped by
the kernels (the slot contributes nothing), matching transformers, which uses id ``E`` as a
"masked" marker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grape_kernels.expert_weights import ACTIVATIONS, ExpertWeights
from grape_kernels.routing import RoutingSpec, kernel_mode

__all__ = [
    "FLOAT_DTYPES",
    "ExpertsProblem",
    "check_route_args",
    "check_align_args",
    "check_experts_args",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_same_device(name: str, tensor: torch.Tensor, reference: torch.Tensor, ref_name: str) -> None:
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {reference.device}")


def check_route_args(logits: torch.Tensor, spec: RoutingSpec) -> str:
    """Validate a ``route_topk(logits, spec)`` call and return the kernel mode that computes it.

    Raises:
        ValueError: naming the offending argument, or the rule no routing kernel implements
            (see :func:`grape_kernels.routing.kernel_mode`); every routing backend calls this,
            so they all refuse the same specs the same way.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"router logits must be a 2-D (tokens, experts) tensor, got {shape}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"router logits must be float16/bfloat16/float32, got {logits.dtype}")
    mode = kernel_mode(spec)
    num_experts = logits.shape[1]
    if num_experts < 1:
        raise ValueError("router logits have zero experts")
    top_k = _check_int("top_k", spec.top_k, 1)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds the number of experts E={num_experts}")
    n_group = _check_int("n_group", spec.n_group, 1)
    topk_group = _check_int("topk_group", spec.topk_group, 1)
    bias = spec.correction_bias
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (num_experts,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else None
            raise ValueError(f"correction_bias must have shape ({num_experts},), got {shape}")
        if bias.dtype not in FLOAT_DTYPES:
            raise ValueError(f"correction_bias must be a float tensor, got {bias.dtype}")
        _check_same_device("correction_bias", bias, logits, "logits")
    if num_experts % n_group != 0:
        raise ValueError(f"E={num_experts} experts cannot be split into n_group={n_group} equal groups")
    if topk_group > n_group:
        raise ValueError(f"topk_group={topk_group} exceeds n_group={n_group}")
    return mode


def check_align_args(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    """Validate an ``align_block_size`` call; raises ``ValueError`` naming the offending argument."""
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        shape = tuple(topk_ids.shape) if isinstance(topk_ids, torch.Tensor) else type(topk_ids).__name__
        raise ValueError(f"topk_ids must be a 2-D (tokens, top_k) tensor, got {shape}")
    if topk_ids.dtype not in ID_DTYPES:
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    _check_int("num_experts", num_experts, 1)
    _check_int("block_m", block_m, 1)
    if topk_ids.shape[1] > num_experts:
        raise ValueError(f"top_k={topk_ids.shape[1]} exceeds the number of experts E={num_experts}")
    rows = topk_ids.numel() + num_experts * (block_m - 1)
    if rows >= 2**31:
        raise ValueError(f"{rows} padded rows overflow the int32 token order; route fewer tokens per call")


@dataclass(frozen=True)
class ExpertsProblem:
    """Sizes of one fused-experts call, read off validated inputs.

    Attributes:
        tokens: T, rows of ``hidden``.
        hidden: H, model width.
        intermediate: I, width of one expert's gate (and of its up) projection.
        experts: E, experts in this layer.
        top_k: k, experts per token.
    """

    tokens: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int


def _check_float(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16/bfloat16/float32, got {tensor.dtype}")
    return tensor


def check_experts_args(
    hidden: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> ExpertsProblem:
    """Validate a ``fused_experts`` call and return its sizes.

    Layouts are those transformers stores (see :class:`~grape_kernels.expert_weights.ExpertWeights`):
    ``transposed=False`` means ``w_gate_up`` (E, 2I, H) and ``w_down`` (E, H, I) (Mixtral,
    Qwen, OLMoE, DeepSeek); ``transposed=True`` means ``w_gate_up`` (E, H, 2I) and ``w_down``
    (E, I, H) (GPT-OSS).
    """
    w_gate_up, w_down = weights.w_gate_up, weights.w_down
    _check_float("hidden", hidden)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (tokens, hidden), got {tuple(hidden.shape)}")
    for name, weight in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        _check_float(name, weight)
        if weight.dim() != 3:
            raise ValueError(f"{name} must be 3-D (experts, ., .), got {tuple(weight.shape)}")
        if weight.dtype != hidden.dtype:
            raise ValueError(f"{name} is {weight.dtype} but hidden is {hidden.dtype}")
        _check_same_device(name, weight, hidden, "hidden")
    if weights.activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {weights.activation!r}; expected one of {ACTIVATIONS}")

    tokens, width = hidden.shape
    experts = w_gate_up.shape[0]
    if weights.transposed:
        gate_up_in, gate_up_out = w_gate_up.shape[1], w_gate_up.shape[2]
        down_in, down_out = w_down.shape[1], w_down.shape[2]
        layout = "transposed: w_gate_up (E, H, 2I), w_down (E, I, H)"
    else:
        gate_up_out, gate_up_in = w_gate_up.shape[1], w_gate_up.shape[2]
        down_out, down_in = w_down.shape[1], w_down.shape[2]
        layout = "w_gate_up (E, 2I, H), w_down (E, H, I)"
    if gate_up_in != width:
        raise ValueError(
            f"w_gate_up {tuple(w_gate_up.shape)} does not take hidden size H={width} ({layout})"
        )
    if gate_up_out % 2 != 0 or gate_up_out == 0:
        raise ValueError(f"w_gate_up output width {gate_up_out} is not 2*I ({layout})")
    intermediate = gate_up_out // 2
    if w_down.shape[0] != experts or down_in != intermediate or down_out != width:
        raise ValueError(
            f"w_down {tuple(w_down.shape)} does not match w_gate_up {tuple(w_gate_up.shape)} "
            f"and H={width} ({layout})"
        )

    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError("topk_ids must be a 2-D (tokens, top_k) tensor")
    if topk_ids.dtype not in ID_DTYPES:
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    _check_same_device("topk_ids", topk_ids, hidden, "hidden")
    top_k = topk_ids.shape[1]
    if topk_ids.shape[0] != tokens:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows but hidden has {tokens} tokens")
    if top_k < 1 or top_k > experts:
        raise ValueError(f"top_k={top_k} must be in [1, E={experts}]")
    _check_float("topk_weights", topk_weights)
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} does not match topk_ids {tuple(topk_ids.shape)}"
        )
    _check_same_device("topk_weights", topk_weights, hidden, "hidden")

    for name, bias, shape in (
        ("gate_up_bias", weights.gate_up_bias, (experts, 2 * intermediate)),
        ("down_bias", weights.down_bias, (experts, width)),
    ):
        if bias is None:
            continue
        _check_float(name, bias)
        if tuple(bias.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(bias.shape)}")
        _check_same_device(name, bias, hidden, "hidden")
    return ExpertsProblem(tokens, width, intermediate, experts, top_k)
