"""The Gram-based re-routing error against the error computed from the expert outputs."""

from __future__ import annotations

import pytest
import torch

from grape.methods.reconstruction import ReroutingError, residual_energy
from grape_kernels.routing import RoutingSpec, dense_routing_weights

SPECS = [
    RoutingSpec(top_k=2, renormalize=True),
    RoutingSpec(top_k=2),
    RoutingSpec(top_k=3, topk_before_softmax=True),
    RoutingSpec(top_k=2, score_fn="sigmoid", renormalize=True, scaling=2.5, n_group=2,
                topk_group=1, group_score="top2_sum", correction_bias=torch.randn(8)),
]


@pytest.mark.parametrize("spec", SPECS)
def test_error_equals_output_difference(spec, make_layer):
    stats, outputs = make_layer(8, tokens=40, spec=spec, seed=11)
    error = ReroutingError(stats)
    logits = stats.token_logits.float()
    full = torch.einsum("te,teh->th", dense_routing_weights(logits, spec).double(), outputs)
    gen = torch.Generator().manual_seed(5)
    for _ in range(6):
        keep = torch.ones(8, dtype=torch.bool)
        keep[torch.randperm(8, generator=gen)[:3]] = False
        pruned = torch.einsum(
            "te,teh->th", dense_routing_weights(logits, spec, keep).double(), outputs
        )
        expected = float((full - pruned).square().sum())
        assert error(keep) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert error(torch.ones(8, dtype=torch.bool)) == pytest.approx(0.0, abs=1e-12)


def test_zero_tokens_give_zero_error(make_layer):
    stats, _ = make_layer(8, tokens=0)
    keep = torch.ones(8, dtype=torch.bool)
    keep[0] = False
    assert ReroutingError(stats)(keep) == 0.0


def test_residual_energy_is_the_residual_streams(make_layer):
    stats, _ = make_layer(8, tokens=10)
    assert residual_energy(stats) == pytest.approx(1000.0)
