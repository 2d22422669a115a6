"""NAEE finds the drop set with the least re-routed output error (brute force from outputs)."""

from __future__ import annotations

import itertools

import pytest
import torch

from grape.budget import Budget, LayerLimits
from grape.methods import get_method
from grape_kernels.routing import RoutingSpec, dense_routing_weights


def _output_error(outputs, logits, spec, drop) -> float:
    """||y - y'||^2 summed over tokens, with the layer re-run on the outputs themselves."""
    keep = torch.ones(outputs.shape[1], dtype=torch.bool)
    keep[list(drop)] = False
    full = torch.einsum("te,teh->th", dense_routing_weights(logits, spec).double(), outputs)
    pruned = torch.einsum("te,teh->th", dense_routing_weights(logits, spec, keep).double(), outputs)
    return float((full - pruned).square().sum())


def _brute_force(outputs, logits, spec, candidates) -> tuple[float, tuple[int, ...]]:
    return min((_output_error(outputs, logits, spec, d), d) for d in candidates)


@pytest.mark.parametrize(
    "spec", [RoutingSpec(top_k=2, renormalize=True), RoutingSpec(top_k=1), RoutingSpec(top_k=2)]
)
def test_exhaustive_equals_brute_force(spec, make_layer, make_limits):
    stats, outputs = {}, {}
    for layer in range(2):
        scale = torch.rand(6, generator=torch.Generator().manual_seed(layer)) + 0.2
        stats[layer], outputs[layer] = make_layer(
            6, tokens=40, spec=spec, seed=layer, layer=layer, out_scale=scale
        )
    plan = get_method("naee")().plan(stats, make_limits(stats, min_keep=2), Budget(ratio=0.5))
    for layer in stats:
        logits = stats[layer].token_logits.float()
        err, best = _brute_force(outputs[layer], logits, spec, itertools.combinations(range(6), 3))
        assert tuple(sorted(set(range(6)) - set(plan.keep[layer]))) == best
        search = plan.info["search"][layer]
        assert search["kind"] == "exhaustive" and search["evaluated"] == 20
        assert search["relative_error"] == pytest.approx(err / 40 / 100.0, rel=1e-9)


def test_beam_search_is_close_to_the_optimum_on_a_bigger_layer(make_layer, make_limits):
    stats, outputs = make_layer(12, tokens=48, top_k=2, seed=7)
    limits = make_limits({0: stats})
    exact = get_method("naee")().plan({0: stats}, limits, Budget(keep_experts=8))
    beam = get_method("naee")(exhaustive_limit=0).plan({0: stats}, limits, Budget(keep_experts=8))
    assert exact.info["search"][0]["kind"] == "exhaustive"
    assert beam.info["search"][0]["kind"] == "beam"
    # Width 8 over single removals: 12 + 8 * (11 + 10 + 9) candidates at most, far fewer than 495.
    assert beam.info["search"][0]["evaluated"] <= 12 + 8 * 30
    optimum = exact.info["search"][0]["relative_error"]
    assert beam.info["search"][0]["relative_error"] <= 1.05 * optimum
    removed = tuple(sorted(set(range(12)) - set(beam.keep[0])))
    logits = stats.token_logits.float()
    assert _output_error(outputs, logits, stats.spec, removed) / (48 * 100.0) == pytest.approx(
        beam.info["search"][0]["relative_error"], rel=1e-9
    )


def test_grouped_layer_search_is_balanced_and_optimal_among_balanced_sets(make_layer):
    spec = RoutingSpec(top_k=2, n_group=2, topk_group=1)
    stats, outputs = make_layer(8, tokens=40, spec=spec, seed=3)
    limits = {0: LayerLimits(8, 4, n_group=2)}
    logits = stats.token_logits.float()
    pairs = list(itertools.combinations(range(4), 2))
    balanced = [a + tuple(4 + e for e in b) for a in pairs for b in pairs]
    _, best = _brute_force(outputs, logits, spec, balanced)
    exhaustive = get_method("naee")().plan({0: stats}, limits, Budget(ratio=0.5))
    assert tuple(sorted(set(range(8)) - set(exhaustive.keep[0]))) == best
    beam = get_method("naee")(exhaustive_limit=0).plan({0: stats}, limits, Budget(ratio=0.5))
    kept = beam.keep[0]
    assert sum(e < 4 for e in kept) == sum(e >= 4 for e in kept) == 2


def test_scores_are_single_removal_errors_and_layers_at_top_k_work(make_layer):
    stats, outputs = make_layer(4, tokens=30, top_k=2, seed=1)
    at_top_k, _ = make_layer(2, tokens=30, top_k=2, seed=2, layer=1)
    limits = {0: LayerLimits(4, 2), 1: LayerLimits(2, 2)}
    plan = get_method("naee")().plan({0: stats, 1: at_top_k}, limits, Budget(keep_experts=2))
    logits = stats.token_logits.float()
    expected = [_output_error(outputs, logits, stats.spec, (e,)) / 3000.0 for e in range(4)]
    assert plan.scores[0] == pytest.approx(expected, rel=1e-9)
    assert plan.keep[1] == [0, 1] and plan.scores[1] == [0.0, 0.0]
