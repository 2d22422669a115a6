"""One layer's experts: exact sparsity, down_proj scored through the pruned gate_up, layouts."""

from __future__ import annotations

import pytest
import torch

from grape.sparsity.masks import parse_pattern
from grape.sparsity.sparsify import SparsityPlan, sparsify_experts


def _oi(experts, name: str) -> torch.Tensor:
    """(E, out, in) copy of a stored expert weight, whatever the layout."""
    weight = getattr(experts, name).detach()
    return weight.transpose(1, 2) if experts.is_transposed else weight


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "1:4"])
@pytest.mark.parametrize("method", ["moe_pruner", "wanda", "magnitude"])
def test_exact_sparsity_per_row_and_group(pattern, method, mixtral_experts, gpt_oss_experts, routed_batch) -> None:
    for experts in (mixtral_experts(seed=1), gpt_oss_experts(seed=2)):
        plan = SparsityPlan.build(method, 0.5 if pattern == "unstructured" else None, parse_pattern(pattern))
        sparsify_experts(experts, [routed_batch(40, 16, 4, seed=3)], plan)
        for name in ("gate_up_proj", "down_proj"):
            kept = _oi(experts, name) != 0
            E, rows, cols = kept.shape
            if pattern == "unstructured":
                assert (kept.sum(dim=2) == cols // 2).all()
            else:
                n, m = map(int, pattern.split(":"))
                assert (kept.reshape(E, rows, cols // m, m).sum(dim=3) == n).all()


def test_down_is_scored_through_the_pruned_gate_up(mixtral_experts, routed_batch) -> None:
    """Reference in float64: prune gate_up, recompute act(gate)*up with it, score and prune down."""
    experts = mixtral_experts(seed=11)
    dense_gate_up = experts.gate_up_proj.detach().double().clone()
    dense_down = experts.down_proj.detach().double().clone()
    batch = routed_batch(64, 16, 4, seed=12)
    sparsify_experts(experts, [batch], SparsityPlan.build("moe_pruner", 0.5, parse_pattern("unstructured")))
    x = batch.hidden.double()
    for e in range(4):
        token, slot = torch.where(batch.ids == e)
        g = batch.weights[token, slot].double().unsqueeze(1)
        xs = x[token]
        gu_scores = dense_gate_up[e].abs() * ((g * xs) ** 2).sum(0).sqrt()
        gu_keep = gu_scores >= gu_scores.sort(dim=1).values[:, 8:9]
        assert torch.equal(experts.gate_up_proj.detach()[e] != 0, gu_keep)
        gate, up = (xs @ (dense_gate_up[e] * gu_keep).T).chunk(2, dim=-1)
        inter = torch.nn.functional.silu(gate) * up
        down_scores = dense_down[e].abs() * ((g * inter) ** 2).sum(0).sqrt()
        down_keep = down_scores >= down_scores.sort(dim=1).values[:, 4:5]
        assert torch.equal(experts.down_proj.detach()[e] != 0, down_keep)
        torch.testing.assert_close(experts.down_proj.detach()[e].double(), dense_down[e] * down_keep)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_transposed_layout_gives_the_same_masks(pattern, gpt_oss_experts, routed_batch) -> None:
    """GPT-OSS stores (in, out); the same expert stored (out, in) must be pruned identically."""
    transposed = gpt_oss_experts(hidden=16, inter=4, seed=21)  # non-square: (16, 8) and (4, 16)
    plain = gpt_oss_experts(hidden=16, inter=4, seed=21)
    plain.is_transposed = False
    with torch.no_grad():
        plain.gate_up_proj = torch.nn.Parameter(transposed.gate_up_proj.detach().transpose(1, 2).clone())
        plain.down_proj = torch.nn.Parameter(transposed.down_proj.detach().transpose(1, 2).clone())
    batch = routed_batch(48, 16, 4, seed=22)
    plan = SparsityPlan.build("moe_pruner", 0.5 if pattern == "unstructured" else None, parse_pattern(pattern))
    sparsify_experts(transposed, [batch], plan)
    sparsify_experts(plain, [batch], plan)
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(_oi(transposed, name), _oi(plain, name))
        assert (_oi(plain, name) == 0).double().mean() == 0.5


def test_expert_without_tokens_falls_back_to_magnitude(mixtral_experts, routed_batch) -> None:
    experts = mixtral_experts(seed=31)
    batch = routed_batch(30, 16, 3, seed=32)  # ids in 0..2: expert 3 never routed
    magnitude = mixtral_experts(seed=31)
    sparsify_experts(magnitude, None, SparsityPlan.build("magnitude", 0.5, parse_pattern("unstructured")))
    report = sparsify_experts(experts, [batch], SparsityPlan.build("wanda", 0.5, parse_pattern("unstructured")))
    assert report["experts_without_tokens"] == [3]
    assert report["tokens_per_expert"][3] == 0
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(getattr(experts, name).detach()[3], getattr(magnitude, name).detach()[3])
        assert report[name]["sparsity"] == 0.5


@pytest.mark.parametrize(
    ("method", "sparsity", "pattern", "why"),
    [
        ("wanda", 1.0, "unstructured", r"\[0, 1\)"),
        ("wanda", -0.1, "unstructured", r"\[0, 1\)"),
        ("wanda", None, "unstructured", "needs --sparsity"),
        ("wanda", 0.6, "2:4", "contradicts"),
        ("sparsegpt", 0.5, "unstructured", "available: magnitude, moe_pruner, wanda"),
    ],
)
def test_plan_rejects_bad_input(method, sparsity, pattern, why) -> None:
    with pytest.raises(ValueError, match=why):
        SparsityPlan.build(method, sparsity, parse_pattern(pattern))


def test_plan_checks_group_width(mixtral_experts) -> None:
    plan = SparsityPlan.build("magnitude", None, parse_pattern("2:16"))
    with pytest.raises(ValueError, match="M=16 does not divide the input width 8 of layer 5 down_proj"):
        plan.check_widths(mixtral_experts(hidden=16, inter=8), "layer 5")


def test_no_tensor_made_while_sparsifying_is_larger_than_the_layer(mixtral_experts, routed_batch) -> None:
    """Sparsify's peak is one layer plus per-expert transients (scores, their sort, a mask).
    Counting the layer's zeros as ``(weight == 0).sum()`` widened a whole layer's mask to int64,
    4x a bf16 layer: +217 MiB, sparsify's peak in ``benchmarks/memory_depth.py``."""
    from torch.profiler import ProfilerActivity, profile

    experts = mixtral_experts(hidden=64, inter=32, experts=8, seed=41).to(torch.bfloat16)
    layer_bytes = sum(p.numel() * p.element_size() for p in experts.parameters())
    plan = SparsityPlan.build("moe_pruner", 0.5, parse_pattern("unstructured"))
    batch = routed_batch(40, 64, 8, seed=42)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        report = sparsify_experts(experts, [batch], plan)
    assert report["gate_up_proj"]["zeros"] == int((experts.gate_up_proj == 0).sum())  # the count is still right
    largest = max(event.cpu_memory_usage for event in profiled.events())  # bytes an op allocated and kept
    assert 0 < largest <= layer_bytes
