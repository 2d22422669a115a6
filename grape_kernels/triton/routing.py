"""Router top-k as one Triton kernel: scores, (group-limited) selection and weights.

Semantics are those of :func:`grape_kernels.routing.route` (the source of truth, and what the tests
compare against); the modes map onto its ``RoutingSpec`` as

========================  ================================================================
``"softmax_topk"``        ``score_fn="softmax"`` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2;
                          group-limited with ``group_score="max"``)
``"topk_softmax"``        ``topk_before_softmax=True`` (GPT-OSS); ``renormalize`` is moot
                          because a softmax over the chosen k already sums to one
``"sigmoid_group"``       ``score_fn="sigmoid"``, ``group_score="top2_sum"`` (DeepSeek-V3)
========================  ================================================================

Design. One program routes ``_BLOCK_T`` tokens. ``E`` is a runtime argument (also excluded
from Triton's value specialisation): the kernel walks each row in fixed tiles of
``_BLOCK_E`` experts, so one compiled kernel serves every layer of a ragged model whatever its
expert count; only ``top_k``, the same for all layers, sets the width of the small register
tile that collects the winners. Top-k is ``k`` arg-max passes; pass ``j`` only considers
experts strictly *after* the previous winner in the order (choice value descending, expert
id ascending), so no "already taken" mask has to be stored and ties resolve to the lowest id.
Softmax top-k selects on the logits themselves (softmax is monotone), so probabilities are
only computed for the k winners. Group-limited routing keeps each token's chosen groups as
the bits of an int32, which turns "is this expert's group chosen" into a shift.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grape_kernels.kernel_checks import check_route_args
from grape_kernels.library import routing_op
from grape_kernels.routing import MODE_CODES, RoutingSpec

__all__ = ["route_topk"]

_BLOCK_T = 32  # tokens per program
_BLOCK_E = 32  # experts per tile; a fixed width keeps E out of the compiled specialisation
_MAX_GROUPS = 32  # chosen groups are kept as bits of an int32
_NO_EXPERT = 2**30  # larger than any expert id, used as "no candidate yet" in arg-min ties

# The kernel's MODE argument takes the codes of grape_kernels.routing.MODE_CODES.
_SOFTMAX_TOPK = tl.constexpr(MODE_CODES["softmax_topk"])
_TOPK_SOFTMAX = tl.constexpr(MODE_CODES["topk_softmax"])
_SIGMOID_GROUP = tl.constexpr(MODE_CODES["sigmoid_group"])


@triton.jit
def _scores(
    logits_ptr,
    bias_ptr,
    rows,
    row_mask,
    experts,
    col_mask,
    stride_le,
    stride_b,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """(score, choice) of a [tokens, experts] tile: the weight source and the selection key.

    ``rows`` are token offsets already multiplied by the row stride. Masked entries get
    choice ``-inf`` so they never win a max.
    """
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(logits_ptr + rows[:, None] + experts[None, :] * stride_le, mask=mask, other=0.0).to(tl.float32)
    if MODE == _SIGMOID_GROUP:
        score = tl.sigmoid(x)
        choice = score
        if HAS_BIAS:
            bias = tl.load(bias_ptr + experts * stride_b, mask=col_mask, other=0.0).to(tl.float32)
            choice = score + bias[None, :]
    else:
        score = x
        choice = x
    return score, tl.where(mask, choice, float("-inf"))


@triton.jit
def _tile_top2(choice, experts, NO_EXPERT: tl.constexpr):
    """Best and second-best value of each row of a tile (of equal values, one counts first)."""
    t1 = tl.max(choice, axis=1)
    first = tl.min(tl.where(choice == t1[:, None], experts[None, :], NO_EXPERT), axis=1)
    t2 = tl.max(tl.where(experts[None, :] == first[:, None], float("-inf"), choice), axis=1)
    return t1, t2


@triton.jit(do_not_specialize=["num_tokens", "num_experts", "per_group", "n_group", "topk_group"])
def _route_kernel(
    logits_ptr,
    bias_ptr,
    ids_ptr,
    weights_ptr,
    num_tokens,
    num_experts,
    top_k,
    per_group,
    n_group,
    topk_group,
    scaling,
    stride_lt,
    stride_le,
    stride_b,
    stride_it,
    stride_wt,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUPED: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    NO_EXPERT: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = tokens < num_tokens
    rows = tokens.to(tl.int64) * stride_lt
    lanes = tl.arange(0, BLOCK_E)

    if MODE == _SOFTMAX_TOPK:
        # Softmax statistics over the full row (max, then sum of exponentials).
        row_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        for e0 in range(0, num_experts, BLOCK_E):
            experts = e0 + lanes
            in_row = experts < num_experts
            _, x = _scores(logits_ptr, bias_ptr, rows, row_mask, experts, in_row, stride_le, stride_b, MODE, HAS_BIAS)
            row_max = tl.maximum(row_max, tl.max(x, axis=1))
        row_max = tl.where(row_mask, row_max, 0.0)
        denom = tl.zeros((BLOCK_T,), tl.float32)
        for e0 in range(0, num_experts, BLOCK_E):
            experts = e0 + lanes
            in_row = experts < num_experts
            _, x = _scores(logits_ptr, bias_ptr, rows, row_mask, experts, in_row, stride_le, stride_b, MODE, HAS_BIAS)
            denom += tl.sum(tl.exp(x - row_max[:, None]), axis=1)
        denom = tl.where(row_mask, denom, 1.0)  # rows past the end are never stored

    if GROUPED:
        # Group score = sum of the two best choice values of the group (DeepSeek-V3) or the best
        # one (DeepSeek-V2, softmax: the best logit ranks groups like the best probability), as
        # a running top-2 over the group's expert tiles; then the best topk_group groups.
        groups = tl.arange(0, BLOCK_G)
        group_score = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
        for g in range(n_group):
            top1 = tl.full((BLOCK_T,), float("-inf"), tl.float32)
            top2 = tl.full((BLOCK_T,), float("-inf"), tl.float32)
            for p0 in range(0, per_group, BLOCK_E):
                experts = g * per_group + p0 + lanes
                _, choice = _scores(
                    logits_ptr,
                    bias_ptr,
                    rows,
                    row_mask,
                    experts,
                    p0 + lanes < per_group,
                    stride_le,
                    stride_b,
                    MODE,
                    HAS_BIAS,
                )
                t1, t2 = _tile_top2(choice, experts, NO_EXPERT)
                top2 = tl.maximum(tl.minimum(top1, t1), tl.maximum(top2, t2))
                top1 = tl.maximum(top1, t1)
            if MODE == _SIGMOID_GROUP:
                score_g = tl.where(per_group > 1, top1 + top2, top1)
            else:
                score_g = top1
            group_score = tl.where(groups[None, :] == g, score_g[:, None], group_score)
        chosen_bits = tl.zeros((BLOCK_T,), tl.int32)
        for _ in range(topk_group):
            open_group = (groups[None, :] < n_group) & (((chosen_bits[:, None] >> groups[None, :]) & 1) == 0)
            cand = tl.where(open_group, group_score, float("-inf"))
            best = tl.max(cand, axis=1)
            pick = tl.min(tl.where(open_group & (cand == best[:, None]), groups[None, :], BLOCK_G), axis=1)
            chosen_bits = chosen_bits | tl.where(pick < BLOCK_G, 1 << pick, 0)

    slots = tl.arange(0, BLOCK_K)
    sel_score = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    sel_id = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    prev_v = tl.full((BLOCK_T,), float("inf"), tl.float32)
    prev_i = tl.full((BLOCK_T,), -1, tl.int32)
    for j in range(top_k):
        best_v = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        best_i = tl.full((BLOCK_T,), NO_EXPERT, tl.int32)
        best_s = tl.zeros((BLOCK_T,), tl.float32)
        for e0 in range(0, num_experts, BLOCK_E):
            experts = e0 + lanes
            in_row = experts < num_experts
            score, choice = _scores(
                logits_ptr, bias_ptr, rows, row_mask, experts, in_row, stride_le, stride_b, MODE, HAS_BIAS
            )
            if GROUPED:
                # Experts outside the chosen groups rank after every eligible one (key -inf, ties
                # to the lowest id): they only fill slots when top_k exceeds the eligible experts,
                # as in transformers, where softmax routing (DeepSeek-V2) gives them weight 0.
                in_chosen = ((chosen_bits[:, None] >> (experts // per_group)[None, :]) & 1) != 0
                choice = tl.where(in_chosen, choice, float("-inf"))
                if MODE == _SOFTMAX_TOPK:
                    score = tl.where(in_chosen, score, float("-inf"))
            after_prev = (choice < prev_v[:, None]) | (
                (choice == prev_v[:, None]) & (experts[None, :] > prev_i[:, None])
            )
            eligible = in_row[None, :] & after_prev
            cand = tl.where(eligible, choice, float("-inf"))
            tile_v = tl.max(cand, axis=1)
            tile_i = tl.min(tl.where(eligible & (cand == tile_v[:, None]), experts[None, :], NO_EXPERT), axis=1)
            tile_s = tl.sum(tl.where(experts[None, :] == tile_i[:, None], score, 0.0), axis=1)
            take = (tile_v > best_v) | ((tile_v == best_v) & (tile_i < best_i))
            best_v = tl.where(take, tile_v, best_v)
            best_i = tl.where(take, tile_i, best_i)
            best_s = tl.where(take, tile_s, best_s)
        sel_score = tl.where(slots[None, :] == j, best_s[:, None], sel_score)
        sel_id = tl.where(slots[None, :] == j, tl.minimum(best_i, num_experts)[:, None], sel_id)
        prev_v = best_v
        prev_i = best_i

    valid = slots[None, :] < top_k
    if MODE == _SOFTMAX_TOPK:
        weights = tl.exp(sel_score - row_max[:, None]) / denom[:, None]
    elif MODE == _TOPK_SOFTMAX:
        top = tl.max(tl.where(valid, sel_score, float("-inf")), axis=1)
        num = tl.where(valid, tl.exp(sel_score - top[:, None]), 0.0)
        weights = num / tl.sum(num, axis=1)[:, None]
    else:
        weights = sel_score
    if RENORMALIZE:
        weights = weights / (tl.sum(tl.where(valid, weights, 0.0), axis=1) + 1e-20)[:, None]
    weights = weights * scaling
    out_mask = row_mask[:, None] & valid
    out_rows = tokens.to(tl.int64)[:, None]
    tl.store(ids_ptr + out_rows * stride_it + slots[None, :], sel_id, mask=out_mask)
    tl.store(weights_ptr + out_rows * stride_wt + slots[None, :], weights, mask=out_mask)


@routing_op("triton")
def route_topk(logits: torch.Tensor, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Route every token: expert ids ``(T, k)`` int32 and weights ``(T, k)`` float32.

    Args:
        logits: ``(T, E)`` router logits (fp16/bf16/fp32, any strides).
        spec: the routing rule (see module doc); its ``correction_bias`` must be on the logits'
            device. Group-limited routing supports ``n_group <= 32``.

    Ids come out in descending order of the selection key, like ``torch.topk``. Ties resolve
    to the lowest expert id (``torch.topk`` leaves them unspecified).
    """
    mode = check_route_args(logits, spec)
    if spec.n_group > _MAX_GROUPS:
        raise ValueError(f"the Triton router supports n_group <= {_MAX_GROUPS}, got {spec.n_group}")
    tokens, num_experts = logits.shape
    top_k, bias = spec.top_k, spec.correction_bias
    ids = torch.empty((tokens, top_k), dtype=torch.int32, device=logits.device)
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=logits.device)
    if tokens == 0:
        return ids, weights
    _route_kernel[(triton.cdiv(tokens, _BLOCK_T),)](
        logits,
        logits if bias is None else bias,  # never read when HAS_BIAS is False
        ids,
        weights,
        tokens,
        num_experts,
        top_k,
        num_experts // spec.n_group,
        spec.n_group,
        spec.topk_group,
        float(spec.scaling),
        logits.stride(0),
        logits.stride(1),
        0 if bias is None else bias.stride(0),
        ids.stride(0),
        weights.stride(0),
        MODE=MODE_CODES[mode],
        HAS_BIAS=bias is not None,
        GROUPED=spec.n_group > 1,
        RENORMALIZE=bool(spec.renormalize) and mode != "topk_softmax",
        BLOCK_T=_BLOCK_T,
        BLOCK_E=_BLOCK_E,
        BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_G=_MAX_GROUPS,
        NO_EXPERT=_NO_EXPERT,
        num_warps=4,
    )
    return ids, weights
