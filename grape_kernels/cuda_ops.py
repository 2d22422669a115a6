"""Python front-end of the optional CUDA extension ``grape_kernels._C`` (sources in ``csrc/``).

The extension is built by ``setup.py`` only where a CUDA toolkit and a CUDA build of torch are
present; everywhere else this module imports fine and :func:`available` says ``False``, so
callers can pick another backend. The wrappers have the signatures of the Triton ones
(:func:`grape_kernels.triton.route_topk`, :func:`grape_kernels.triton.align_block_size`) and
validate input with the same shared checks before anything reaches the device.

Differences from the Triton versions, both inherent to the CUDA design (one warp per token,
atomic cursors): ``top_k <= 32`` and ``n_group <= 32``; and within one expert the order of the
sorted slots is not deterministic (the grouped GEMM's result does not depend on it).
"""

from __future__ import annotations

import torch

from grape_kernels.kernel_checks import check_align_args, check_route_args
from grape_kernels.library import align_op, routing_op
from grape_kernels.routing import MODE_CODES, RoutingSpec

try:
    from grape_kernels import _C
except ImportError:
    _C = None

__all__ = ["available", "route_topk", "align_block_size", "MAX_TOP_K", "MAX_GROUPS"]

MAX_TOP_K = 32  # grape::kMaxTopK in csrc/moe_kernels.h
MAX_GROUPS = 32  # grape::kMaxGroups


def available() -> bool:
    """True when the extension was built and a CUDA device can run it."""
    return _C is not None and torch.cuda.is_available()


def _require_device(tensor: torch.Tensor, name: str) -> None:
    if _C is None:
        raise RuntimeError(
            "the CUDA extension grape_kernels._C is not built; install grape with a CUDA toolkit and "
            "a CUDA build of torch (pip install --no-build-isolation .) or use another backend"
        )
    if tensor.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for the cuda backend, got device {tensor.device}")


@routing_op("cuda")
def route_topk(logits: torch.Tensor, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Route every token on the GPU: ids ``(T, k)`` int32 and weights ``(T, k)`` float32.

    Same contract as :func:`grape_kernels.triton.route_topk` (and semantics as
    :func:`grape_kernels.routing.route`); ties resolve to the lowest expert id.
    """
    mode = check_route_args(logits, spec)
    if spec.top_k > MAX_TOP_K:
        raise ValueError(f"the CUDA router supports top_k <= {MAX_TOP_K}, got {spec.top_k}")
    if spec.n_group > MAX_GROUPS:
        raise ValueError(f"the CUDA router supports n_group <= {MAX_GROUPS}, got {spec.n_group}")
    _require_device(logits, "logits")
    tokens = logits.shape[0]
    ids = torch.empty((tokens, spec.top_k), dtype=torch.int32, device=logits.device)
    weights = torch.empty((tokens, spec.top_k), dtype=torch.float32, device=logits.device)
    if tokens == 0:
        return ids, weights
    # The kernel reads the (E,)-sized bias as contiguous fp32; converting it is negligible.
    bias = None if spec.correction_bias is None else spec.correction_bias.to(torch.float32).contiguous()
    with torch.cuda.device(logits.device):
        _C.route_topk(
            logits,
            bias,
            ids,
            weights,
            spec.top_k,
            MODE_CODES[mode],
            bool(spec.renormalize) and mode != "topk_softmax",
            float(spec.scaling),
            spec.n_group,
            spec.topk_group,
            torch.cuda.current_stream(logits.device).cuda_stream,
        )
    return ids, weights


@align_op("cuda")
def align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-sorted, ``block_m``-padded slot order; same outputs as the Triton version.

    Returns ``sorted_token_ids`` int32 ``(T*k + E*(block_m-1),)`` (padding = ``T*k``),
    ``expert_ids`` int32 per tile (``-1`` past the padded total) and the 0-dim int32
    ``num_tokens_post_padded``. No host synchronisation.
    """
    check_align_args(topk_ids, num_experts, block_m)
    _require_device(topk_ids, "topk_ids")
    device = topk_ids.device
    rows = topk_ids.numel() + num_experts * (block_m - 1)
    sorted_ids = torch.empty((rows,), dtype=torch.int32, device=device)
    expert_ids = torch.empty((-(-rows // block_m),), dtype=torch.int32, device=device)
    post_pad = torch.empty((), dtype=torch.int32, device=device)
    workspace = torch.empty((2 * num_experts,), dtype=torch.int32, device=device)
    with torch.cuda.device(device):
        _C.align_block_size(
            topk_ids,
            num_experts,
            block_m,
            sorted_ids,
            expert_ids,
            post_pad,
            workspace,
            torch.cuda.current_stream(device).cuda_stream,
        )
    return sorted_ids, expert_ids, post_pad
