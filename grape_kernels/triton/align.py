"""Align-block-size: the expert-sorted, block-padded token order the grouped GEMM consumes.

The grouped GEMM computes one ``BLOCK_M``-row tile per program and needs every tile to belong
to a single expert. So the ``T*k`` (token, slot) pairs are sorted by expert and each expert's
run is padded to a multiple of ``block_m`` with the sentinel ``T*k`` (which the GEMM masks).
Experts that received no tokens get no tiles at all, so they cost nothing downstream.

Everything stays on the device and nothing is read back to the host: outputs are sized for
the worst case ``T*k + E*(block_m - 1)`` rows, and the real extent is returned as a 0-dim
device tensor that the GEMM programs read to exit early.

Three small kernels, none with atomics, so the order is deterministic and *stable* (within an
expert, slots keep their flat order ``t*k + j``), which makes runs reproducible bit for bit:

1. ``_count_kernel``: each program takes ``_CHUNK`` flat slots and writes its per-expert hit
   counts (a one-hot compare against expert tiles; E is a runtime loop bound).
2. ``_prefix_kernel``: per expert, an exclusive prefix sum over chunks (where in the expert's
   run each chunk starts) and the expert's total.
3. ``_place_kernel``: per chunk, slot position = padded start of its expert + chunk prefix +
   rank among earlier slots of the chunk with the same expert; the same launch also writes the
   expert of every GEMM tile (count of experts whose padded run ends before the tile) and the
   padded total.

Ids outside ``[0, E)`` match no expert and are dropped (see ``grape_kernels.kernel_checks``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grape_kernels.kernel_checks import check_align_args
from grape_kernels.library import align_op

__all__ = ["align_block_size", "align_capacity"]

_CHUNK = 128  # flat slots per program in the count / place kernels
_BLOCK_E = 32  # experts per one-hot tile: CHUNK x BLOCK_E int32 stays well inside registers
_BLOCK_C = 64  # chunks per tile in the prefix kernel
_BLOCK_B = 128  # GEMM tiles labelled per program in the place kernel


def align_capacity(num_slots: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """Worst-case (padded rows, GEMM tiles) for ``num_slots = T*k`` slots over ``E`` experts."""
    rows = num_slots + num_experts * (block_m - 1)
    return rows, triton.cdiv(rows, block_m)


@triton.jit
def _load_ids(ids_ptr, flat, valid, top_k, stride_it, stride_ik):
    """Expert ids of flat slots ``t*k + j`` read through the (T, k) strides; -1 where masked."""
    token = (flat // top_k).to(tl.int64)
    slot = (flat % top_k).to(tl.int64)
    return tl.load(ids_ptr + token * stride_it + slot * stride_ik, mask=valid, other=-1)


@triton.jit(do_not_specialize=["numel", "num_experts"])
def _count_kernel(
    ids_ptr,
    chunk_counts_ptr,
    numel,
    top_k,
    num_experts,
    stride_it,
    stride_ik,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    chunk = tl.program_id(0)
    flat = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = _load_ids(ids_ptr, flat, flat < numel, top_k, stride_it, stride_ik)
    row = chunk_counts_ptr + chunk.to(tl.int64) * num_experts
    for e0 in range(0, num_experts, BLOCK_E):
        experts = e0 + tl.arange(0, BLOCK_E)
        hits = (ids[:, None] == experts[None, :]).to(tl.int32)
        tl.store(row + experts, tl.sum(hits, axis=0), mask=experts < num_experts)


@triton.jit(do_not_specialize=["num_chunks", "num_experts"])
def _prefix_kernel(
    chunk_counts_ptr,
    chunk_offsets_ptr,
    counts_ptr,
    num_chunks,
    num_experts,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    in_range = experts < num_experts
    carry = tl.zeros((BLOCK_E,), tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        offs = chunks[:, None].to(tl.int64) * num_experts + experts[None, :]
        mask = (chunks[:, None] < num_chunks) & in_range[None, :]
        tile = tl.load(chunk_counts_ptr + offs, mask=mask, other=0)
        exclusive = tl.cumsum(tile, axis=0) - tile + carry[None, :]
        tl.store(chunk_offsets_ptr + offs, exclusive, mask=mask)
        carry += tl.sum(tile, axis=0)
    tl.store(counts_ptr + experts, carry, mask=in_range)


@triton.jit(do_not_specialize=["numel", "num_experts", "num_chunks", "num_blocks"])
def _place_kernel(
    ids_ptr,
    chunk_offsets_ptr,
    counts_ptr,
    sorted_ptr,
    expert_ids_ptr,
    post_pad_ptr,
    numel,
    top_k,
    num_experts,
    block_m,
    num_chunks,
    num_blocks,
    stride_it,
    stride_ik,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_E)
    if pid < num_chunks:
        flat = pid * CHUNK + tl.arange(0, CHUNK)
        valid = flat < numel
        ids = _load_ids(ids_ptr, flat, valid, top_k, stride_it, stride_ik)
        prefix_row = chunk_offsets_ptr + pid.to(tl.int64) * num_experts
        pos = tl.zeros((CHUNK,), tl.int32)
        found = tl.zeros((CHUNK,), tl.int32)
        run_start = tl.full([], 0, tl.int32)
        for e0 in range(0, num_experts, BLOCK_E):
            experts = e0 + lanes
            in_range = experts < num_experts
            count = tl.load(counts_ptr + experts, mask=in_range, other=0)
            padded = (count + block_m - 1) // block_m * block_m
            start = run_start + tl.cumsum(padded, axis=0) - padded
            run_start += tl.sum(padded, axis=0)
            before = tl.load(prefix_row + experts, mask=in_range, other=0)
            hits = ((ids[:, None] == experts[None, :]) & in_range[None, :]).to(tl.int32)
            rank = tl.cumsum(hits, axis=0) - hits
            pos += tl.sum(hits * (start[None, :] + before[None, :] + rank), axis=1)
            found += tl.sum(hits, axis=1)
        tl.store(sorted_ptr + pos, flat, mask=valid & (found > 0))
    if pid * BLOCK_B < num_blocks:
        blocks = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        first_row = blocks * block_m
        owner = tl.zeros((BLOCK_B,), tl.int32)
        total = tl.full([], 0, tl.int32)
        for e0 in range(0, num_experts, BLOCK_E):
            experts = e0 + lanes
            in_range = experts < num_experts
            count = tl.load(counts_ptr + experts, mask=in_range, other=0)
            padded = (count + block_m - 1) // block_m * block_m
            end = total + tl.cumsum(padded, axis=0)
            total += tl.sum(padded, axis=0)
            ended = (end[None, :] <= first_row[:, None]) & in_range[None, :]
            owner += tl.sum(ended.to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, tl.where(first_row < total, owner, -1), mask=blocks < num_blocks)
        if pid == 0:
            tl.store(post_pad_ptr, total)


@align_op("triton")
def align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the ``T*k`` routed slots by expert, padding each expert's run to ``block_m`` rows.

    Args:
        topk_ids: ``(T, k)`` int32/int64 expert ids (any strides).
        num_experts: ``E`` of this layer (runtime; no power-of-two assumption).
        block_m: rows per GEMM tile.

    Returns:
        ``sorted_token_ids`` int32 ``(T*k + E*(block_m-1),)``: flat slot ``t*k + j`` per row,
        expert by expert in expert order, padding rows and the unused tail hold ``T*k``;
        ``expert_ids`` int32 ``(cdiv(rows, block_m),)``: the expert of each tile, ``-1`` for
        tiles past the padded total; ``num_tokens_post_padded``: 0-dim int32 padded total.
    """
    check_align_args(topk_ids, num_experts, block_m)
    device = topk_ids.device
    tokens, top_k = topk_ids.shape
    numel = tokens * top_k
    rows, num_blocks = align_capacity(numel, num_experts, block_m)
    sorted_ids = torch.full((rows,), numel, dtype=torch.int32, device=device)
    expert_ids = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
    post_pad = torch.zeros((), dtype=torch.int32, device=device)
    if numel == 0:
        return sorted_ids, expert_ids, post_pad

    num_chunks = triton.cdiv(numel, _CHUNK)
    chunk_counts = torch.empty((num_chunks, num_experts), dtype=torch.int32, device=device)
    chunk_offsets = torch.empty_like(chunk_counts)
    counts = torch.empty((num_experts,), dtype=torch.int32, device=device)
    stride_it, stride_ik = topk_ids.stride()
    _count_kernel[(num_chunks,)](
        topk_ids, chunk_counts, numel, top_k, num_experts, stride_it, stride_ik, CHUNK=_CHUNK, BLOCK_E=_BLOCK_E
    )
    _prefix_kernel[(triton.cdiv(num_experts, _BLOCK_E),)](
        chunk_counts, chunk_offsets, counts, num_chunks, num_experts, BLOCK_C=_BLOCK_C, BLOCK_E=_BLOCK_E
    )
    grid = (max(num_chunks, triton.cdiv(num_blocks, _BLOCK_B)),)
    _place_kernel[grid](
        topk_ids,
        chunk_offsets,
        counts,
        sorted_ids,
        expert_ids,
        post_pad,
        numel,
        top_k,
        num_experts,
        block_m,
        num_chunks,
        num_blocks,
        stride_it,
        stride_ik,
        CHUNK=_CHUNK,
        BLOCK_E=_BLOCK_E,
        BLOCK_B=_BLOCK_B,
    )
    return sorted_ids, expert_ids, post_pad
