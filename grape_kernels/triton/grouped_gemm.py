"""Fused MoE experts as two grouped GEMMs (Triton) plus a top-k reduction.

Pipeline for ``T`` tokens routed to ``k`` of ``E`` experts (``T*k`` "slots", slot ``t*k + j``):

1. :func:`~grape_kernels.triton.align.align_block_size` sorts slots by expert and pads each
   expert's run to ``BLOCK_M`` rows; every ``BLOCK_M`` tile belongs to one expert.
2. ``_gate_up_kernel``: per tile, ``x[token] @ W_gate_up[e]`` for the gate *and* up columns of
   an output block in one ``tl.dot`` (the weight tile interleaves them: column ``2c`` is gate
   ``c``, column ``2c+1`` is up ``c``), bias, activation in the epilogue, written in the input
   dtype to ``act[slot]`` (``T*k, I``). The interleaving is pure index maths: for weights stored
   ``[gate rows; up rows]`` weight row of gate ``c`` is ``c`` and of up ``c`` is ``I + c``; for
   GPT-OSS's interleaved storage they are ``2c`` and ``2c + 1``, which also makes each tile
   load one contiguous run.
3. ``_down_kernel``: per tile, ``act[slot] @ W_down[e]``, + bias, times the slot's routing
   weight, written to ``y[slot]`` (``T*k, H``).
4. ``_topk_sum_kernel``: ``out[t] = sum_j y[t*k + j]`` in fp32, skipping slots whose expert id
   is outside ``[0, E)`` (dropped, see ``grape_kernels.kernel_checks``).

Weights are read exactly as transformers stores them, transposed or not, through strides: no
copy, no ``.contiguous()``. ``E`` is never a compile-time constant (and is excluded from
Triton's value specialisation), so one compiled kernel serves every layer of a ragged model.
The grid is sized for the worst-case padded row count (known on the host without a sync);
tiles past the real padded total return at once, and experts without tokens own no tiles.
Accumulation is fp32; fp32 inputs use IEEE dots unless ``torch.set_float32_matmul_precision``
allows TF32, mirroring what ``torch.matmul`` would do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grape_kernels.expert_weights import ExpertWeights
from grape_kernels.kernel_checks import ExpertsProblem, check_experts_args
from grape_kernels.library import experts_op
from grape_kernels.triton.align import align_block_size
from grape_kernels.triton.tuning import KernelConfig, select_config

__all__ = ["fused_experts"]

_ACTIVATION_CODES = {"silu": 0, "gpt_oss": 1}


@triton.jit
def _tile_coords(num_rows, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in grouped order.

    Consecutive programs walk GROUP_M row tiles (mostly the same expert) before moving to the
    next column tile, so a weight tile is fetched from HBM once and then served from L2.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(num_rows, BLOCK_M)
    tiles_n = tl.cdiv(num_cols, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_rows(sorted_ids_ptr, expert_ids_ptr, pid_m, num_valid, BLOCK_M: tl.constexpr):
    """The expert of row tile ``pid_m``, its slots, and which of them are real (not padding)."""
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    return expert, slots, slots < num_valid


@triton.jit
def _accumulate(
    a_ptrs,
    w_ptrs,
    row_mask,
    col_mask,
    depth,
    stride_ak,
    stride_wk,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 (BLOCK_M, BLOCK_N) tile of ``a @ w`` over ``depth``, from pointers to the first K block."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        k_mask = offs_k < depth - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit(do_not_specialize=["num_valid", "num_rows"])
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    post_pad_ptr,
    num_valid,
    num_rows,
    top_k,
    inter,
    hidden,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_be,
    stride_bn,
    stride_om,
    stride_on,
    alpha,
    limit,
    ACTIVATION: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    HALF_N: tl.constexpr = BLOCK_N // 2
    pid_m, pid_n = _tile_coords(num_rows, inter, BLOCK_M, HALF_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(post_pad_ptr):
        return
    expert, slots, row_mask = _tile_rows(sorted_ids_ptr, expert_ids_ptr, pid_m, num_valid, BLOCK_M)
    tokens = (slots // top_k).to(tl.int64)

    # Weight column j of the tile feeds output column pid_n * HALF_N + j // 2, as gate (j even)
    # or up (j odd). Interleaved storage makes that the contiguous run pid_n * BLOCK_N + j,
    # written so that Triton's contiguity analysis sees it (vectorised, pipelined loads when
    # the 2I axis has unit stride, as in GPT-OSS).
    cols = tl.arange(0, BLOCK_N)
    if INTERLEAVED:
        w_row = pid_n * BLOCK_N + cols
        col_mask = w_row < 2 * inter
    else:
        out_col = pid_n * HALF_N + cols // 2
        w_row = out_col + (cols % 2) * inter
        col_mask = out_col < inter
    w_row = w_row.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + w_row[None, :] * stride_wn
    acc = _accumulate(
        x_ptrs, w_ptrs, row_mask, col_mask, hidden, stride_xk, stride_wk, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K
    )

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + w_row * stride_bn, mask=col_mask, other=0.0).to(tl.float32)
        acc += bias[None, :]
    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, HALF_N, 2)))
    if ACTIVATION == 0:
        act = gate * tl.sigmoid(gate) * up
    else:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        act = (up + 1.0) * gate * tl.sigmoid(alpha * gate)

    offs_c = pid_n * HALF_N + tl.arange(0, HALF_N)
    out_ptrs = out_ptr + slots.to(tl.int64)[:, None] * stride_om + offs_c[None, :] * stride_on
    tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_c[None, :] < inter))


@triton.jit(do_not_specialize=["num_valid", "num_rows"])
def _down_kernel(
    a_ptr,
    w_ptr,
    bias_ptr,
    topk_w_ptr,
    out_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    post_pad_ptr,
    num_valid,
    num_rows,
    top_k,
    hidden,
    inter,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
    stride_be,
    stride_bn,
    stride_tw_t,
    stride_tw_k,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(num_rows, hidden, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(post_pad_ptr):
        return
    expert, slots, row_mask = _tile_rows(sorted_ids_ptr, expert_ids_ptr, pid_m, num_valid, BLOCK_M)
    slots64 = slots.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + slots64[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
    acc = _accumulate(
        a_ptrs, w_ptrs, row_mask, col_mask, inter, stride_ak, stride_wk, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K
    )

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    token = slots64 // top_k
    route_w_ptrs = topk_w_ptr + token * stride_tw_t + (slots64 - token * top_k) * stride_tw_k
    route_w = tl.load(route_w_ptrs, mask=row_mask, other=0.0)
    acc = acc * route_w.to(tl.float32)[:, None]
    out_ptrs = out_ptr + slots64[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=["num_tokens", "num_experts"])
def _topk_sum_kernel(
    y_ptr,
    ids_ptr,
    out_ptr,
    num_tokens,
    hidden,
    top_k,
    num_experts,
    stride_ym,
    stride_it,
    stride_ik,
    stride_ot,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_tile = (tokens < num_tokens)[:, None] & (cols < hidden)[None, :]
    tokens64 = tokens.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in range(top_k):
        expert = tl.load(ids_ptr + tokens64 * stride_it + j * stride_ik, mask=tokens < num_tokens, other=-1)
        # A dropped slot (id outside [0, E)) was never written: read nothing from its row.
        routed = (expert >= 0) & (expert < num_experts)
        rows = (tokens64 * top_k + j) * stride_ym
        y = tl.load(y_ptr + rows[:, None] + cols[None, :], mask=in_tile & routed[:, None], other=0.0)
        acc += y.to(tl.float32)
    out_ptrs = out_ptr + tokens64[:, None] * stride_ot + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_tile)


def _input_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots unless the user opted into TF32 for fp32 matmuls (as torch does)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _weight_args(weight: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """(expert, K, N) strides of a 3-D weight: K is dim 2 of (E, N, K) storage, dim 1 if transposed."""
    if transposed:
        return weight.stride(0), weight.stride(1), weight.stride(2)
    return weight.stride(0), weight.stride(2), weight.stride(1)


def _bias_args(bias: torch.Tensor | None, placeholder: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(pointer, expert stride, column stride) of an optional bias; the placeholder is never read."""
    if bias is None:
        return placeholder, 0, 0
    return bias, bias.stride(0), bias.stride(1)


def _launch(
    problem: ExpertsProblem,
    hidden: torch.Tensor,
    weights: ExpertWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: KernelConfig,
) -> torch.Tensor:
    """Run align + both GEMMs + reduction for validated inputs; returns ``(T, H)``."""
    tokens, width, inter = problem.tokens, problem.hidden, problem.intermediate
    device, dtype = hidden.device, hidden.dtype
    num_slots = tokens * problem.top_k
    sorted_ids, expert_ids, post_pad = align_block_size(topk_ids, problem.experts, config.block_m)
    num_rows = sorted_ids.shape[0]
    tiles_m = triton.cdiv(num_rows, config.block_m)
    routing = (sorted_ids, expert_ids, post_pad, num_slots, num_rows, problem.top_k)
    launch = dict(
        HAS_BIAS=weights.gate_up_bias is not None,
        INPUT_PRECISION=_input_precision(dtype),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )

    act = torch.empty((num_slots, inter), dtype=dtype, device=device)
    gate_up_bias, stride_be, stride_bn = _bias_args(weights.gate_up_bias, weights.w_gate_up)
    _gate_up_kernel[(tiles_m * triton.cdiv(inter, config.block_n // 2),)](
        hidden,
        weights.w_gate_up,
        gate_up_bias,
        act,
        *routing,
        inter,
        width,
        *hidden.stride(),
        *_weight_args(weights.w_gate_up, weights.transposed),
        stride_be,
        stride_bn,
        *act.stride(),
        float(weights.swiglu_alpha),
        float(weights.swiglu_limit),
        ACTIVATION=_ACTIVATION_CODES[weights.activation],
        INTERLEAVED=bool(weights.interleaved),
        **launch,
    )

    y = torch.empty((num_slots, width), dtype=dtype, device=device)
    launch["HAS_BIAS"] = weights.down_bias is not None
    down_bias, stride_be, stride_bn = _bias_args(weights.down_bias, weights.w_down)
    _down_kernel[(tiles_m * triton.cdiv(width, config.block_n),)](
        act,
        weights.w_down,
        down_bias,
        topk_weights,
        y,
        *routing,
        width,
        inter,
        *act.stride(),
        *_weight_args(weights.w_down, weights.transposed),
        stride_be,
        stride_bn,
        *topk_weights.stride(),
        *y.stride(),
        **launch,
    )

    out = torch.empty((tokens, width), dtype=dtype, device=device)
    block_t, block_h = 16, min(256, triton.next_power_of_2(width))
    _topk_sum_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(width, block_h))](
        y,
        topk_ids,
        out,
        tokens,
        width,
        problem.top_k,
        problem.experts,
        y.stride(0),
        *topk_ids.stride(),
        out.stride(0),
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        num_warps=4,
    )
    return out


@experts_op("triton")
def fused_experts(
    hidden: torch.Tensor,
    weights: ExpertWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Output of the routed experts of one MoE layer, ``(T, H)`` in ``hidden``'s dtype.

    Args:
        hidden: ``(T, H)`` token activations (fp16/bf16/fp32, any strides).
        weights: the layer's weights and layout (:class:`~grape_kernels.expert_weights.ExpertWeights`;
            any strides). Biases are added before the activation / after the down projection;
            ``activation="gpt_oss"`` clamps gate above at ``swiglu_limit`` and up to
            ``+-swiglu_limit`` and computes ``(up + 1) * gate * sigmoid(swiglu_alpha * gate)``.
        topk_ids: ``(T, k)`` int32/int64 expert of each slot; ids outside ``[0, E)`` are dropped.
        topk_weights: ``(T, k)`` routing weights (any float dtype), applied after the down
            projection (and its bias).
        config: explicit block sizes (the tuner uses this); default: the tuning table.
    """
    problem = check_experts_args(hidden, weights, topk_ids, topk_weights)
    if problem.tokens == 0:
        return hidden.new_empty((0, problem.hidden))
    if config is None:
        tokens_per_expert = problem.tokens * problem.top_k / problem.experts
        config = select_config(
            2 * problem.intermediate, problem.hidden, tokens_per_expert, hidden.element_size(), hidden.device
        )
    return _launch(problem, hidden, weights, topk_ids, topk_weights, config)
