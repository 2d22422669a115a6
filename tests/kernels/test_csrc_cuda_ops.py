"""The Python front-end of the CUDA extension: availability, validation, and (on a GPU with
the extension built) agreement with grape_kernels.routing.route and a plain align-block-size loop.

On a machine without a GPU only the first part runs; the GPU part is what to run once the
extension is built on real hardware.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from grape_kernels import cuda_ops
from grape_kernels.routing import RoutingSpec, kernel_spec, route

needs_extension = pytest.mark.skipif(not cuda_ops.available(), reason="needs grape_kernels._C and a CUDA device")


def test_unavailable_without_extension_or_gpu():
    assert cuda_ops.available() == (cuda_ops._C is not None and torch.cuda.is_available())


def test_missing_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_C", None)
    assert not cuda_ops.available()
    with pytest.raises(RuntimeError, match="grape_kernels._C is not built"):
        cuda_ops.route_topk(torch.randn(3, 8), RoutingSpec(top_k=2))
    with pytest.raises(RuntimeError, match="grape_kernels._C is not built"):
        cuda_ops.align_block_size(torch.zeros(3, 2, dtype=torch.int32), 8, 16)


def test_cpu_tensors_are_rejected_before_launch(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_C", object())  # a "built" extension that must never be called
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        cuda_ops.route_topk(torch.randn(3, 8), RoutingSpec(top_k=2))
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        cuda_ops.align_block_size(torch.zeros(3, 2, dtype=torch.int32), 8, 16)


@pytest.mark.parametrize(
    "args, options, match",
    [
        ((torch.randn(3, 40), 33), {}, "top_k <= 32"),
        ((torch.randn(3, 66), 2), {"score_fn": "sigmoid", "group_score": "top2_sum", "n_group": 33}, "n_group <= 32"),
        ((torch.randn(3, 8), 9), {}, "exceeds the number of experts"),
        ((torch.randn(3, 8), 2), {"score_fn": "bogus"}, "unknown routing score_fn"),
    ],
)
def test_route_topk_validates_input(args, options, match):
    logits, top_k = args
    with pytest.raises(ValueError, match=match):
        cuda_ops.route_topk(logits, RoutingSpec(top_k=top_k, **options))


def test_align_validates_input():
    with pytest.raises(ValueError, match="int32 or int64"):
        cuda_ops.align_block_size(torch.zeros(3, 2), 8, 16)


@needs_extension
@pytest.mark.parametrize(
    "mode, experts, top_k, options",
    [
        ("softmax_topk", 8, 2, {"renormalize": True}),
        ("softmax_topk", 200, 8, {}),
        ("topk_softmax", 32, 4, {"scaling": 2.0}),
        ("sigmoid_group", 64, 8, {"n_group": 8, "topk_group": 4, "renormalize": True, "scaling": 2.5}),
        ("sigmoid_group", 144, 4, {"n_group": 3, "topk_group": 2}),
        ("softmax_topk", 64, 6, {"n_group": 8, "topk_group": 3}),  # DeepSeek-V2 group_limited_greedy
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_route_topk_matches_reference(mode, experts, top_k, options, dtype):
    gen = torch.Generator().manual_seed(experts * 31 + top_k)
    logits = torch.randn(257, experts, generator=gen).to(dtype)
    bias = torch.randn(experts, generator=gen) * 0.5 if mode == "sigmoid_group" else None
    spec = kernel_spec(mode, top_k, correction_bias=bias, **options)
    ids, weights = cuda_ops.route_topk(
        logits.cuda(), dataclasses.replace(spec, correction_bias=None if bias is None else bias.cuda())
    )
    ref_ids, ref_weights = route(logits.float(), spec)
    same = (ids.cpu().long() == ref_ids).all(dim=1)
    assert same.float().mean() > (0.999 if dtype == torch.float32 else 0.95)  # bf16 logits tie often
    torch.testing.assert_close(weights.cpu()[same], ref_weights[same], rtol=1e-5, atol=1e-6)


@needs_extension
@pytest.mark.parametrize(
    "tokens, top_k, experts, block_m", [(0, 2, 8, 16), (1, 1, 1, 16), (300, 8, 64, 16), (4096, 2, 5, 64)]
)
def test_cuda_align_block_size_matches_loop(tokens, top_k, experts, block_m):
    gen = torch.Generator().manual_seed(tokens + experts)
    ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k].to(torch.int32)
    sorted_ids, expert_ids, post_pad = (t.cpu() for t in cuda_ops.align_block_size(ids.cuda(), experts, block_m))
    flat, numel, row = ids.reshape(-1).tolist(), tokens * top_k, 0
    for expert in range(experts):
        slots = [i for i, e in enumerate(flat) if e == expert]
        padded = -(-len(slots) // block_m) * block_m
        run = sorted_ids[row : row + padded].tolist()
        assert sorted(run[: len(slots)]) == slots  # order inside a run is free
        assert run[len(slots) :] == [numel] * (padded - len(slots))
        assert expert_ids[row // block_m : (row + padded) // block_m].tolist() == [expert] * (padded // block_m)
        row += padded
    assert int(post_pad) == row
    assert bool((sorted_ids[row:] == numel).all()) and bool((expert_ids[row // block_m :] == -1).all())


@needs_extension
@pytest.mark.parametrize("mode", ["softmax_topk", "sigmoid_group"])
def test_cuda_route_topk_beyond_the_chosen_groups_equals_triton(mode):
    """top_k above the chosen groups' experts: both GPU routers fill the slots with the lowest ids
    outside the groups (the rule tests/kernels/test_triton_routing.py checks against float64)."""
    triton_routing = pytest.importorskip("grape_kernels.triton")
    gen = torch.Generator().manual_seed(17)
    logits = torch.randn(300, 8, generator=gen).cuda()
    bias = (torch.randn(8, generator=gen) * 0.1).cuda() if mode == "sigmoid_group" else None
    spec = kernel_spec(mode, 3, correction_bias=bias, n_group=4, topk_group=1, renormalize=True)
    ids, weights = cuda_ops.route_topk(logits, spec)
    ref_ids, ref_weights = triton_routing.route_topk(logits, spec)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
