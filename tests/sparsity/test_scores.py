"""Scores and statistics against independent float64 re-computations; router weighting matters."""

from __future__ import annotations

import pytest
import torch

from grape.calibration.runner import NonFiniteActivationError
from grape.sparsity.collect import RoutedBatch, capture_routed_inputs, input_stats
from grape.sparsity.masks import parse_pattern
from grape.sparsity.scores import CRITERIA, get_criterion
from grape.sparsity.sparsify import SparsityPlan, sparsify_experts
from grape_kernels.experts_module import expert_activation


def _dense_gates(batches: list[RoutedBatch], experts: int) -> torch.Tensor:
    """(T, E) float64 routing weights, zero where a token is not routed to an expert."""
    rows = []
    for batch in batches:
        dense = torch.zeros(batch.ids.shape[0], experts, dtype=torch.float64)
        dense.scatter_(1, batch.ids, batch.weights.double())
        rows.append(dense)
    return torch.cat(rows)


def _reference_scores(weight_oi: torch.Tensor, inputs: torch.Tensor, gates: torch.Tensor, method: str) -> torch.Tensor:
    """S_rc in float64 from the formulas: |W| * sqrt(sum_t (g x_tc)^2) or with g = 1 on routed t."""
    w = weight_oi.double().abs()
    if method == "magnitude":
        return w
    g = gates if method == "moe_pruner" else (gates > 0).double()
    return w * ((g.unsqueeze(1) * inputs.double()) ** 2).sum(dim=0).sqrt().unsqueeze(0)


@pytest.mark.parametrize("method", CRITERIA.names())
def test_gate_up_scores_match_float64_reference(method, mixtral_experts, routed_batch) -> None:
    experts = mixtral_experts(seed=3)
    batches = [routed_batch(23, 16, 4, seed=4), routed_batch(17, 16, 4, seed=5)]
    gates = _dense_gates(batches, 4)
    x = torch.cat([b.hidden for b in batches])
    stats = input_stats(batches, 4, 16)
    for e in range(4):
        weight = experts.gate_up_proj.detach()[e]
        got = get_criterion(method).score(weight, stats, e)
        want = _reference_scores(weight, x, gates[:, e], method)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        assert int(stats.tokens[e]) == int((gates[:, e] > 0).sum())


def test_down_statistics_use_the_intermediate_activation(mixtral_experts, routed_batch) -> None:
    experts = mixtral_experts(seed=6)
    batches = [routed_batch(31, 16, 4, seed=7)]
    gates = _dense_gates(batches, 4)[:, 2]
    x = batches[0].hidden.double()
    stats = input_stats(batches, 4, 8, lambda e, h: expert_activation(experts, e, h, dtype=torch.float32))
    gate, up = (x @ experts.gate_up_proj.detach()[2].double().T).chunk(2, dim=-1)
    inter = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(stats.gated_sq[2], ((gates.unsqueeze(1) * inter) ** 2).sum(0), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(stats.plain_sq[2], (((gates > 0).double().unsqueeze(1) * inter) ** 2).sum(0), rtol=1e-5, atol=1e-9)


def test_router_weighting_changes_the_choice(mixtral_experts) -> None:
    """Column 0 is large on a token the router barely trusts; column 1 small on a trusted one.

    Wanda (g = 1) sees sqrt(4) = 2 > 1 and prunes column 1; MoE-Pruner sees 0.1 * 2 = 0.2 <
    0.9 * 1 and prunes column 0.
    """
    experts = mixtral_experts(hidden=2, inter=2, experts=2)
    with torch.no_grad():
        experts.gate_up_proj.fill_(1.0)
    batch = RoutedBatch(
        hidden=torch.tensor([[2.0, 0.0], [0.0, 1.0]]),
        ids=torch.tensor([[0, 1], [0, 1]]),
        weights=torch.tensor([[0.1, 0.9], [0.9, 0.1]]),
    )
    kept = {}
    for method in ("wanda", "moe_pruner"):
        copy = mixtral_experts(hidden=2, inter=2, experts=2)
        copy.load_state_dict(experts.state_dict())
        sparsify_experts(copy, [batch], SparsityPlan.build(method, 0.5, parse_pattern("unstructured")))
        kept[method] = (copy.gate_up_proj.detach()[0] != 0).tolist()
    assert kept["wanda"] == [[True, False]] * 4
    assert kept["moe_pruner"] == [[False, True]] * 4


def test_capture_reads_the_layers_own_routing() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4))
    for param in block.parameters():  # the experts are allocated with torch.empty
        torch.nn.init.normal_(param)
    x = torch.randn(2, 5, 16)
    dense = block(x)
    with capture_routed_inputs(block.experts, layer=0) as batches:
        block(x)
        block(x[:1])
    assert len(batches) == 2
    _, weights, ids = block.gate(x.reshape(-1, 16))
    torch.testing.assert_close(batches[0].hidden, x.reshape(-1, 16))
    assert torch.equal(batches[0].ids, ids)
    torch.testing.assert_close(batches[0].weights, weights)
    torch.testing.assert_close(block(x), dense)  # the real forward is back
    with pytest.raises(NonFiniteActivationError, match="layer 3"):
        with capture_routed_inputs(block.experts, layer=3):
            block(torch.full_like(x, float("nan")))
