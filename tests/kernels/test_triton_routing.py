"""Triton routing and align-block-size kernels against independent references.

Routing is checked three ways on fresh random logits: the chosen experts' selection keys must
be the top-k keys of a float64 recomputation (tie-proof), the weights must match a float64
recomputation at the chosen ids, and for fp32 inputs ids and weights must equal
:func:`grape_kernels.routing.route`, the project's source of truth for router semantics.
Align-block-size is compared element for element with a plain Python loop over experts.
The grid over E / top_k / tokens / dtype is sampled, not crossed, to keep the interpreter fast.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch
from triton_device import DEVICE, require_interpreted

pytest.importorskip("triton")

from grape_kernels.routing import RoutingSpec, kernel_spec, route  # noqa: E402
from grape_kernels.triton import align_block_size, route_topk  # noqa: E402
from grape_kernels.triton import routing as triton_routing  # noqa: E402

require_interpreted(triton_routing._route_kernel)

pytestmark = pytest.mark.interpreter

F32, F16 = torch.float32, torch.float16


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _group_keep(key: torch.Tensor, mode: str, n_group: int, topk_group: int) -> torch.Tensor:
    """Bool (T, E): experts in the chosen groups (groups scored by their two best keys for
    DeepSeek-V3's sigmoid routing, by their best one for DeepSeek-V2's softmax routing)."""
    tokens, experts = key.shape
    if n_group == 1:
        return torch.ones(tokens, experts, dtype=torch.bool)
    per_group = experts // n_group
    best = 2 if mode == "sigmoid_group" else 1
    group_score = key.view(tokens, n_group, per_group).topk(min(best, per_group), dim=-1).values.sum(dim=-1)
    chosen = group_score.topk(topk_group, dim=-1).indices
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, chosen, True)
    return keep.repeat_interleave(per_group, dim=1)


def _selection_key(
    logits: torch.Tensor, mode: str, bias: torch.Tensor | None, n_group: int, topk_group: int
) -> torch.Tensor:
    """Float64 key the router ranks experts by, with experts of unchosen groups at -inf."""
    x = logits.double().cpu()
    key = x.sigmoid() + (0.0 if bias is None else bias.double().cpu()) if mode == "sigmoid_group" else x
    return key.masked_fill(~_group_keep(key, mode, n_group, topk_group), float("-inf"))


def _weights64(logits: torch.Tensor, ids: torch.Tensor, mode: str, renormalize: bool, scaling: float,
               n_group: int = 1, topk_group: int = 1) -> torch.Tensor:
    """Float64 routing weights of the given ids (softmax outside the chosen groups: zero)."""
    x, idx = logits.double().cpu(), ids.long().cpu()
    if mode == "softmax_topk":
        probs = x.softmax(dim=-1).masked_fill(~_group_keep(x, mode, n_group, topk_group), 0.0)
        weights = probs.gather(1, idx)
    elif mode == "topk_softmax":
        weights = x.gather(1, idx).softmax(dim=-1)
    else:
        weights = x.sigmoid().gather(1, idx)
    if renormalize and mode != "topk_softmax":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scaling


def _check_routing(logits, top_k, mode, renormalize=False, scaling=1.0, bias=None, n_group=1, topk_group=1):
    spec = kernel_spec(mode, top_k, renormalize=renormalize, scaling=scaling, correction_bias=bias, n_group=n_group,
                       topk_group=topk_group)
    ids, weights = route_topk(logits, spec)
    tokens, experts = logits.shape
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (tokens, top_k)
    assert ids.device == weights.device == logits.device
    if tokens == 0:
        return
    ids, weights = ids.cpu(), weights.cpu()
    assert bool(((ids >= 0) & (ids < experts)).all())
    assert bool((ids.sort(dim=1).values.diff(dim=1) > 0).all()), "an expert was chosen twice"

    key = _selection_key(logits, mode, bias, n_group, topk_group)
    chosen = key.gather(1, ids.long())
    torch.testing.assert_close(chosen, key.topk(top_k, dim=1).values, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        weights.double(), _weights64(logits, ids, mode, renormalize, scaling, n_group, topk_group), rtol=1e-5, atol=1e-6
    )

    cpu_bias = None if bias is None else bias.float().cpu()
    ref_ids, ref_weights = route(logits.float().cpu(), dataclasses.replace(spec, correction_bias=cpu_bias))
    if logits.dtype == torch.float32:  # fp32 random logits have no ties: exact agreement
        assert torch.equal(ids.long(), ref_ids)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


ROUTE_CASES = [
    # (mode, E, top_k, tokens, dtype, options)
    ("softmax_topk", 1, 1, 7, F32, {}),
    ("softmax_topk", 2, 2, 1, F16, {"renormalize": True}),
    ("softmax_topk", 3, 2, 300, F32, {"renormalize": True}),
    ("softmax_topk", 8, 2, 300, F16, {}),
    ("softmax_topk", 13, 4, 7, F32, {"renormalize": True, "scaling": 2.5}),
    ("softmax_topk", 64, 8, 7, F16, {"renormalize": True}),
    ("softmax_topk", 200, 8, 7, F32, {}),
    ("softmax_topk", 5, 4, 0, F32, {}),
    ("softmax_topk", 64, 6, 7, F32, {"n_group": 8, "topk_group": 3}),  # DeepSeek-V2 group_limited_greedy
    ("softmax_topk", 16, 4, 300, F16, {"n_group": 4, "topk_group": 2, "renormalize": True}),
    ("topk_softmax", 5, 4, 7, F32, {}),
    ("topk_softmax", 8, 1, 300, F16, {}),
    ("topk_softmax", 64, 4, 7, F32, {"scaling": 0.5, "renormalize": True}),
    ("sigmoid_group", 8, 2, 7, F32, {"bias": True}),
    ("sigmoid_group", 13, 1, 300, F16, {"renormalize": True}),
    ("sigmoid_group", 64, 8, 7, F32, {"bias": True, "n_group": 8, "topk_group": 4, "renormalize": True, "scaling": 2}),
    ("sigmoid_group", 144, 4, 7, F32, {"bias": True, "n_group": 3, "topk_group": 2}),
    ("sigmoid_group", 8, 4, 1, F16, {"bias": True, "n_group": 8, "topk_group": 4}),
    ("sigmoid_group", 64, 8, 0, F32, {"n_group": 4, "topk_group": 2}),
]
if DEVICE == "cuda":  # the interpreter computes bfloat16 wrongly (triton-lang/triton#4972): compiled kernels only
    ROUTE_CASES += [
        ("softmax_topk", 64, 8, 300, torch.bfloat16, {"renormalize": True}),
        ("topk_softmax", 32, 4, 300, torch.bfloat16, {}),
        ("sigmoid_group", 256, 8, 300, torch.bfloat16, {"bias": True, "n_group": 8, "topk_group": 4, "renormalize": True}),
        ("softmax_topk", 160, 6, 300, torch.bfloat16, {"n_group": 8, "topk_group": 3}),
    ]


@pytest.mark.parametrize("mode, experts, top_k, tokens, dtype, options", ROUTE_CASES)
def test_route_topk_matches_reference(mode, experts, top_k, tokens, dtype, options):
    gen = _generator(zlib.crc32(repr((mode, experts, top_k, tokens)).encode()))
    logits = torch.randn(tokens, experts, generator=gen).to(device=DEVICE, dtype=dtype)
    options = dict(options)
    bias = torch.randn(experts, generator=gen).mul(0.5).to(DEVICE) if options.pop("bias", False) else None
    _check_routing(logits, top_k, mode, bias=bias, **options)


@pytest.mark.parametrize("mode", ["softmax_topk", "sigmoid_group"])
def test_route_topk_non_contiguous_inputs(mode):
    gen = _generator(7)
    experts, tokens = 24, 7
    logits = torch.randn(experts, 2 * tokens, generator=gen).to(DEVICE).t()[::2]  # strides (1, 2E)
    assert not logits.is_contiguous()
    bias = torch.randn(2 * experts, generator=gen).to(DEVICE)[::2] if mode == "sigmoid_group" else None
    n_group, topk_group = (4, 2) if mode == "sigmoid_group" else (1, 1)
    _check_routing(logits, 4, mode, renormalize=True, bias=bias, n_group=n_group, topk_group=topk_group)


@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax"])
def test_route_topk_equals_routing_after_pruning(mode):
    """-inf logits (experts removed) route exactly like grape_kernels.routing.route with a keep mask."""
    gen = _generator(11)
    logits = torch.randn(7, 13, generator=gen)
    keep = torch.ones(13, dtype=torch.bool)
    keep[[0, 4, 5, 12]] = False
    spec = kernel_spec(mode, 4, renormalize=True)
    ids, weights = route_topk(logits.masked_fill(~keep, float("-inf")).to(DEVICE), spec)
    ref_ids, ref_weights = route(logits, spec, keep=keep)
    assert torch.equal(ids.cpu().long(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["softmax_topk", "sigmoid_group"])
def test_route_topk_fills_slots_beyond_the_chosen_groups(mode):
    """top_k above the experts of the chosen groups runs, as transformers' DeepSeek routers do:
    the eligible experts come first, then the lowest ids outside the chosen groups, weighted by
    their sigmoid score (V3) or zero (V2, whose probabilities outside the groups are zeroed)."""
    gen = _generator(13)
    logits = torch.randn(9, 8, generator=gen)
    bias = torch.randn(8, generator=gen) * 0.1 if mode == "sigmoid_group" else None
    options = dict(n_group=4, topk_group=1, renormalize=mode == "sigmoid_group", scaling=2.5)
    spec = kernel_spec(mode, 3, correction_bias=bias, **options)
    ids, weights = route_topk(logits.to(DEVICE), dataclasses.replace(spec, correction_bias=_on_device(bias)))
    ids, weights = ids.cpu().long(), weights.cpu()
    key = _selection_key(logits, mode, bias, 4, 1)
    eligible = key.topk(2, dim=1).indices
    assert torch.equal(ids[:, :2], eligible)
    outside = torch.isinf(key)
    assert torch.equal(ids[:, 2], outside.int().argmax(dim=1)), "the lowest id outside the chosen group"
    expected = _weights64(logits, ids, mode, options["renormalize"], 2.5, 4, 1)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)
    assert (weights[:, 2] == 0).all() == (mode == "softmax_topk")
    ref_ids, ref_weights = route(logits, spec)
    assert torch.equal(ref_ids, ids)
    torch.testing.assert_close(ref_weights, weights, rtol=1e-5, atol=1e-6)


def _on_device(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(DEVICE)


def test_route_topk_ties_resolve_to_lowest_id():
    ids, weights = route_topk(torch.zeros(3, 6, device=DEVICE), kernel_spec("softmax_topk", 4))
    assert ids.cpu().tolist() == [[0, 1, 2, 3]] * 3
    torch.testing.assert_close(weights.cpu(), torch.full((3, 4), 1 / 6))


def _softmax(top_k, **fields) -> RoutingSpec:
    return RoutingSpec(top_k=top_k, **fields)


def _grouped(top_k, **fields) -> RoutingSpec:
    return RoutingSpec(top_k=top_k, score_fn="sigmoid", **{"group_score": "top2_sum", **fields})


BAD_ROUTES = [
    (lambda: (torch.randn(6), _softmax(2)), "2-D"),
    (lambda: (torch.randint(0, 3, (4, 6)), _softmax(2)), "float16/bfloat16/float32"),
    (lambda: (torch.randn(4, 6), _softmax(7)), "exceeds the number of experts"),
    (lambda: (torch.randn(4, 6), _softmax(0)), "top_k must be >= 1"),
    (lambda: (torch.randn(4, 6), _softmax(2.0)), "top_k must be an int"),
    (lambda: (torch.randn(4, 6), _softmax(2, score_fn="softmax2")), "unknown routing score_fn"),
    (lambda: (torch.randn(4, 6), _softmax(2, correction_bias=torch.zeros(6))), "only used by sigmoid routing"),
    (lambda: (torch.randn(4, 6), _softmax(2, n_group=2, group_score="top2_sum")), "groups scored by 'max'"),
    (lambda: (torch.randn(4, 6), _softmax(2, n_group=2, topk_before_softmax=True)), "no kernel for top-k before"),
    (lambda: (torch.randn(4, 6), _grouped(2, n_group=2, group_score="max")), "groups scored by 'top2_sum'"),
    (lambda: (torch.randn(4, 6), _grouped(2, correction_bias=torch.zeros(5))), "shape \\(6,\\)"),
    (lambda: (torch.randn(4, 6), _grouped(2, n_group=4)), "equal groups"),
    (lambda: (torch.randn(4, 6), _grouped(2, n_group=3, topk_group=4)), "exceeds n_group"),
    (lambda: (torch.randn(4, 66), _grouped(2, n_group=33)), "n_group <= 32"),
    (lambda: (torch.randn(4, 6), _grouped(2, correction_bias=torch.zeros(6, device="meta"))), "is on meta"),
]


@pytest.mark.parametrize("make, match", BAD_ROUTES)
def test_route_topk_rejects_bad_input(make, match):
    logits, spec = make()
    with pytest.raises(ValueError, match=match):
        route_topk(logits, spec)


def _align_reference(ids: torch.Tensor, experts: int, block_m: int) -> tuple[list[int], list[int]]:
    """Expert-sorted flat slots, each expert's run padded with the sentinel, and tile experts."""
    flat = ids.reshape(-1).tolist()
    sentinel = len(flat)
    order, tile_experts = [], []
    for expert in range(experts):
        slots = [i for i, e in enumerate(flat) if e == expert]
        if not slots:
            continue
        padded = -(-len(slots) // block_m) * block_m
        order += slots + [sentinel] * (padded - len(slots))
        tile_experts += [expert] * (padded // block_m)
    return order, tile_experts


def _make_ids(kind: str, tokens: int, top_k: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "one_expert":
        return torch.full((tokens, top_k), 5, dtype=torch.int64)
    if kind == "skewed":  # only the first and last expert receive tokens
        return torch.randint(0, 2, (tokens, top_k), generator=gen) * (experts - 1)
    ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k]  # distinct per token
    if kind == "dropped":  # -1 and E mark dropped slots
        ids[0, 0], ids[-1, -1] = -1, experts
    return ids


ALIGN_CASES = [
    # (tokens, top_k, E, block_m, ids kind, dtype)
    (0, 2, 5, 16, "random", torch.int32),
    (1, 1, 1, 16, "random", torch.int64),
    (7, 2, 3, 4, "random", torch.int32),
    (7, 4, 13, 1, "random", torch.int64),
    (300, 2, 64, 4, "random", torch.int32),
    (300, 8, 64, 16, "random", torch.int64),
    (300, 1, 8, 16, "one_expert", torch.int32),
    (100, 2, 13, 16, "skewed", torch.int64),
    (7, 2, 5, 16, "dropped", torch.int64),
]


@pytest.mark.parametrize("tokens, top_k, experts, block_m, kind, dtype", ALIGN_CASES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_align_block_size_matches_reference(tokens, top_k, experts, block_m, kind, dtype, contiguous):
    gen = _generator(tokens * 1000 + experts * 10 + top_k)
    ids = _make_ids(kind, tokens, top_k, experts, gen).to(dtype)
    reference, tile_experts = _align_reference(ids, experts, block_m)
    ids = ids.to(DEVICE) if contiguous else ids.t().contiguous().to(DEVICE).t()
    sorted_ids, expert_ids, post_pad = align_block_size(ids, experts, block_m)

    numel = tokens * top_k
    rows = numel + experts * (block_m - 1)
    assert sorted_ids.dtype == expert_ids.dtype == post_pad.dtype == torch.int32
    assert sorted_ids.shape == (rows,) and expert_ids.shape == (-(-rows // block_m),) and post_pad.dim() == 0
    sorted_ids, expert_ids, total = sorted_ids.cpu(), expert_ids.cpu(), int(post_pad)
    assert total == len(reference)
    assert sorted_ids[:total].tolist() == reference
    assert bool((sorted_ids[total:] == numel).all())
    assert expert_ids[: len(tile_experts)].tolist() == tile_experts
    assert bool((expert_ids[len(tile_experts) :] == -1).all())


BAD_ALIGNS = [
    (lambda: (torch.zeros(4, 2), 4, 16), "int32 or int64"),
    (lambda: (torch.zeros(8, dtype=torch.int32), 4, 16), "2-D"),
    (lambda: (torch.zeros(4, 5, dtype=torch.int32), 4, 16), "exceeds the number of experts"),
    (lambda: (torch.zeros(4, 2, dtype=torch.int32), 4, 0), "block_m must be >= 1"),
    (lambda: (torch.zeros(4, 2, dtype=torch.int32), 0, 16), "num_experts must be >= 1"),
    (lambda: (torch.zeros(4, 2, dtype=torch.int32), True, 16), "num_experts must be an int"),
]


@pytest.mark.parametrize("make, match", BAD_ALIGNS)
def test_align_block_size_rejects_bad_input(make, match):
    ids, experts, block_m = make()
    with pytest.raises(ValueError, match=match):
        align_block_size(ids, experts, block_m)
