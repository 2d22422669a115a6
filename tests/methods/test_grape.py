"""GRAPE: redundant experts go first, the budget goes where removals are cheap, the guard works.

The reference below re-implements the global greedy the slow, obvious way, straight from the
expert outputs (no Gram matrices, no lazy per-layer sequences): every step costs every
(layer, expert, neighbour) and applies the cheapest.
"""

from __future__ import annotations

import json

import pytest
import torch

from grape.budget import Budget, LayerLimits
from grape.methods import get_method
from grape_kernels.routing import RoutingSpec, dense_routing_weights

UNGUARDED = {"entropy_floor": 0.0, "max_layer_share": 1.0}
TWINS = {1: 0, 3: 2, 5: 4, 7: 6}


def _naive_greedy(layers: dict, total: int, min_keep: int) -> list[tuple]:
    """Reference trace [(layer, expert, substitute, cost)] computed from outputs directly.

    Costs are divided by the model-wide mean residual energy per token times the layer's
    sample count (the default ``normaliser="model"``).
    """
    all_resid = torch.cat([stats.token_resid_sq for stats, _ in layers.values()])
    per_token = float(all_resid.sum()) / all_resid.numel()
    state = {}
    for layer, (stats, outputs) in layers.items():
        weights = dense_routing_weights(stats.token_logits.float(), stats.spec).double()
        state[layer] = {
            "out": {e: outputs[:, e].clone() for e in range(outputs.shape[1])},
            "w": {e: weights[:, e].clone() for e in range(outputs.shape[1])},
            "energy": per_token * stats.token_resid_sq.numel(),
        }
    trace = []
    for _ in range(total):
        best = None
        for layer in sorted(state):
            st = state[layer]
            if len(st["out"]) <= min_keep:
                continue
            for e in sorted(st["out"]):
                for n in sorted(st["out"]):
                    if n == e:
                        continue
                    diff = (st["out"][e] - st["out"][n]).square().sum(-1)
                    cost = float((st["w"][e].square() * diff).sum()) / st["energy"]
                    if best is None or cost < best[3]:
                        best = (layer, e, n, cost)
        layer, e, n, _ = best
        st = state[layer]
        st["w"][n] += st["w"].pop(e)
        st["out"].pop(e)
        trace.append(best)
    return trace


def _model(make_layer, num_layers=3, experts=8, **kwargs):
    """Independent random layers; returns {layer: (stats, outputs)}."""
    return {
        layer: make_layer(experts, tokens=40, seed=100 + layer, layer=layer, **kwargs)
        for layer in range(num_layers)
    }


def _plan(layers, make_limits, **kwargs):
    stats = {layer: s for layer, (s, _) in layers.items()}
    budget = {k: kwargs.pop(k) for k in ("ratio", "keep_experts") if k in kwargs}
    return get_method("grape")(**kwargs).plan(stats, make_limits(stats), Budget(**budget))


@pytest.mark.parametrize("merge", [False, True])
def test_trace_matches_the_naive_global_greedy(merge, make_layer, make_limits):
    scale = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.3, 1.5, 1.0, 0.8])
    layers = _model(make_layer, out_scale=scale)
    plan = _plan(layers, make_limits, ratio=0.5, merge=merge, **UNGUARDED)
    expected = _naive_greedy(layers, 12, min_keep=2)  # merge mode plans exactly as drop mode
    got = [(t["layer"], t["expert"], t["substitute"], t["cost"]) for t in plan.info["trace"]]
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    assert [g[3] for g in got] == pytest.approx([e[3] for e in expected], rel=1e-9, abs=1e-15)
    assert all(t["merged_into"] == (t["substitute"] if merge else None) for t in plan.info["trace"])


@pytest.mark.parametrize("top_k", [1, 2])
def test_identical_experts_are_the_first_removal_at_zero_cost(top_k, make_layer, make_limits):
    layers = _model(make_layer, top_k=top_k)
    layers[1] = make_layer(8, tokens=40, seed=7, layer=1, top_k=top_k, copies={6: 2})
    plan = _plan(layers, make_limits, ratio=0.25)
    first = plan.info["trace"][0]
    assert (first["layer"], {first["expert"], first["substitute"]}) == (1, {2, 6})
    assert first["cost"] == 0.0
    assert plan.scores[1][2] == plan.scores[1][6] == 0.0


def test_never_routed_expert_costs_nothing_and_goes_first(make_layer, make_limits):
    layers = _model(make_layer)
    layers[2] = make_layer(8, tokens=40, seed=9, layer=2, never_routed=(5,))
    plan = _plan(layers, make_limits, ratio=0.125)
    assert plan.scores[2][5] == 0.0
    assert (plan.info["trace"][0]["layer"], plan.info["trace"][0]["expert"]) == (2, 5)


def test_initial_scores_are_the_cheapest_substitution_from_outputs(make_layer, make_limits):
    layers = _model(make_layer, num_layers=1)
    stats, outputs = layers[0]
    plan = _plan(layers, make_limits, ratio=0.125)
    weights = dense_routing_weights(stats.token_logits.float(), stats.spec).double()
    diff = (outputs.unsqueeze(2) - outputs.unsqueeze(1)).square().sum(-1)  # (S, e, n)
    cost = torch.einsum("te,ten->en", weights.square(), diff) / float(stats.token_resid_sq.sum())
    cost.fill_diagonal_(float("inf"))
    assert plan.scores[0] == pytest.approx(cost.min(1).values.tolist(), rel=1e-9)


def _redundant_layer(make_layer, layer, seed):
    """A layer of four duplicate pairs: four removals there are free."""
    return make_layer(8, tokens=40, seed=seed, layer=layer, copies=TWINS)


def test_ragged_allocation_concentrates_removals_in_the_redundant_layer(make_layer, make_limits):
    layers = _model(make_layer)
    layers[1] = _redundant_layer(make_layer, 1, seed=3)
    plan = _plan(layers, make_limits, ratio=0.125, **UNGUARDED)
    assert plan.info["removed_per_layer"] == {0: 0, 1: 3, 2: 0}
    # Each removed expert's twin stays: the removals are exactly redundant ones.
    for expert in set(range(8)) - set(plan.keep[1]):
        assert expert ^ 1 in plan.keep[1]


def test_entropy_guard_restarts_and_spreads_the_budget(make_layer, make_limits):
    layers = _model(make_layer, num_layers=4)
    layers[1] = _redundant_layer(make_layer, 1, seed=3)
    free = _plan(layers, make_limits, ratio=0.125, **UNGUARDED)
    guarded = _plan(layers, make_limits, ratio=0.125)
    assert free.info["guard"]["restarts"] == 0
    assert free.info["removed_per_layer"] == {0: 0, 1: 4, 2: 0, 3: 0}  # collapse
    guard = guarded.info["guard"]
    # (4,), then capped at 3: share 3/4, then at 2: share 1/2 and entropy >= 0.75.
    assert guard["restarts"] == 2 and guard["caps"] == {1: 2} and guard["relaxed"] is None
    assert guard["entropy"] > free.info["guard"]["entropy"] == 0.0
    assert guard["entropy"] >= 0.5 and guard["max_share"] <= 0.5
    assert guarded.info["removed_per_layer"][1] == 2
    assert sum(guarded.info["removed_per_layer"].values()) == 4
    # The redundant pairs still go first: the guard only trims the layer's later removals.
    assert [t["cost"] for t in guarded.info["trace"][:2]] == [0.0, 0.0]
    assert all(t["cost"] > 0.0 for t in guarded.info["trace"][2:])


def test_unreachable_guard_terminates_and_says_so(make_layer, make_limits):
    layers = _model(make_layer, num_layers=2)
    plan = _plan(layers, make_limits, ratio=0.25, max_layer_share=0.1)
    guard = plan.info["guard"]
    # No split of 4 removals over 2 layers gives a share <= 0.1: capping runs out, and the
    # capped layers fall back to the uniform split.
    assert "uniform" in guard["relaxed"]
    assert plan.info["removed_per_layer"] == guard["caps"] == {0: 2, 1: 2}


@pytest.mark.parametrize("cost", ["substitution", "reroute"])
def test_min_keep_and_group_balance_are_respected(cost, make_layer):
    spec = RoutingSpec(top_k=2, n_group=2, topk_group=1)
    redundant, _ = make_layer(8, tokens=40, seed=1, layer=0, spec=spec, copies=TWINS)
    other, _ = make_layer(8, tokens=40, seed=2, layer=1, spec=spec)
    limits = {0: LayerLimits(8, 4, n_group=2), 1: LayerLimits(8, 4, n_group=2)}
    method = get_method("grape")(cost=cost, **UNGUARDED)
    plan = method.plan({0: redundant, 1: other}, limits, Budget(ratio=0.5))
    for kept in plan.keep.values():
        assert len(kept) >= 4
        assert sum(e < 4 for e in kept) == sum(e >= 4 for e in kept)
    assert plan.info["removed_per_layer"] == {0: 4, 1: 4}
    trace = plan.info["trace"]
    # Removals come in group steps: one expert of each group, consecutively.
    assert all({t["expert"] < 4 for t in trace[i : i + 2]} == {True, False} for i in range(0, 8, 2))
    if cost == "substitution":
        # Substitutes come from the removed expert's own group; the twins go first for free.
        assert all((t["expert"] < 4) == (t["substitute"] < 4) for t in trace)
        assert trace[0]["cost"] == trace[1]["cost"] == 0.0 and trace[0]["layer"] == 0


def test_merge_targets_are_nearest_neighbours_resolved_to_kept_experts(
    make_layer, from_outputs, make_limits
):
    layers = _model(make_layer, num_layers=2)
    # Expert 3 is expert 5 plus a little noise: its nearest neighbour by far.
    stats, outputs = layers[0]
    noisy = outputs.clone()
    noise = torch.randn(outputs[:, 5].shape, generator=torch.Generator().manual_seed(1))
    noisy[:, 3] = outputs[:, 5] + 0.01 * noise.double()
    layers[0] = (from_outputs(noisy, stats.token_logits.float(), stats.spec, layer=0), noisy)
    plan = _plan(layers, make_limits, ratio=0.5, merge=True, **UNGUARDED)
    first = plan.info["trace"][0]
    assert (first["layer"], {first["expert"], first["merged_into"]}) == (0, {3, 5})
    for layer, targets in plan.merge_into.items():
        assert set(targets) == set(range(8)) - set(plan.keep[layer])
        assert set(targets.values()) <= set(plan.keep[layer])
        chain = {t["expert"]: t["merged_into"] for t in plan.info["trace"] if t["layer"] == layer}
        for expert, target in targets.items():
            hop = chain[expert]
            while hop in chain:
                hop = chain[hop]
            assert hop == target


def test_same_inputs_same_plan_and_the_plan_is_json(make_layer, make_limits):
    layers = _model(make_layer)
    first = _plan(layers, make_limits, ratio=0.5, merge=True)
    second = _plan(layers, make_limits, ratio=0.5, merge=True)
    assert json.dumps(first.__dict__, sort_keys=True) == json.dumps(second.__dict__, sort_keys=True)


def test_reroute_cost_is_the_exact_error_increase(make_layer, make_limits):
    layers = _model(make_layer, num_layers=2)
    plan = _plan(layers, make_limits, ratio=0.25, cost="reroute", **UNGUARDED)
    current = {layer: 0.0 for layer in layers}
    keep = {layer: torch.ones(8, dtype=torch.bool) for layer in layers}
    for step in plan.info["trace"]:
        layer = step["layer"]
        stats, outputs = layers[layer]
        logits = stats.token_logits.float()

        def output(mask=None, logits=logits, stats=stats, outputs=outputs):
            weights = dense_routing_weights(logits, stats.spec, mask).double()
            return torch.einsum("te,teh->th", weights, outputs)

        def error(mask):
            return float((output() - output(mask)).square().sum()) / 4000.0

        increases = {}
        for e in keep[layer].nonzero().flatten().tolist():
            trial = keep[layer].clone()
            trial[e] = False
            increases[e] = error(trial) - current[layer]
        assert step["expert"] == min(increases, key=increases.get)
        assert step["cost"] == pytest.approx(increases[step["expert"]], rel=1e-9, abs=1e-15)
        keep[layer][step["expert"]] = False
        current[layer] = error(keep[layer])
    assert plan.merge_into == {0: {}, 1: {}}


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="drop"):
        get_method("grape")(merge=True, cost="reroute")
    with pytest.raises(ValueError, match="'substitution' or 'reroute'"):
        get_method("grape")(cost="cosine")
    with pytest.raises(ValueError, match="entropy_floor"):
        get_method("grape")(entropy_floor=1.5)


def test_zero_tokens_and_layers_at_top_k_just_work(make_layer):
    empty, _ = make_layer(8, tokens=0, layer=0)
    at_top_k, _ = make_layer(2, tokens=10, layer=1)
    normal, _ = make_layer(8, tokens=10, layer=2)
    limits = {0: LayerLimits(8, 2), 1: LayerLimits(2, 2), 2: LayerLimits(8, 2)}
    plan = get_method("grape")().plan({0: empty, 1: at_top_k, 2: normal}, limits, Budget(keep_experts=2))
    assert [len(k) for k in plan.keep.values()] == [2, 2, 2]


def test_model_normaliser_uses_one_scale_and_layer_normaliser_the_layers_own(make_layer, make_limits):
    """Two layers with the same outputs but a 100x larger residual stream in the second."""
    import copy

    stats, outputs = make_layer(8, tokens=40, seed=11, layer=0)
    louder = copy.copy(stats)
    louder.layer = 1
    louder.token_resid_sq = stats.token_resid_sq * 100
    layers = {0: (stats, outputs), 1: (louder, outputs)}
    model_plan = _plan(layers, make_limits, ratio=0.125)
    assert model_plan.scores[1] == pytest.approx(model_plan.scores[0], rel=1e-12)
    assert model_plan.info["normaliser"].startswith("model-mean")
    layer_plan = _plan(layers, make_limits, ratio=0.125, normaliser="layer")
    assert layer_plan.scores[1] == pytest.approx([s / 100 for s in layer_plan.scores[0]], rel=1e-9)
    with pytest.raises(ValueError, match="normaliser"):
        get_method("grape")(normaliser="nope")
