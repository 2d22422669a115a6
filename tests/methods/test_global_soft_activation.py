"""global_soft_activation ranks router-probability shares of all layers together."""

from __future__ import annotations

import pytest
import torch

from grape.budget import Budget, BudgetError, LayerLimits
from grape.methods import get_method
from grape_kernels.routing import RoutingSpec


def _layer_with_weak_experts(make_layer, layer, weak, seed, tokens=48):
    stats, _ = make_layer(8, tokens=tokens, seed=seed, layer=layer)
    stats.token_logits[:, list(weak)] -= 3.0
    stats.soft_mass = stats.token_logits.softmax(-1).sum(0)
    return stats


def test_removals_go_to_the_layer_with_low_mass_experts(make_layer, make_limits):
    stats = {
        0: _layer_with_weak_experts(make_layer, 0, (), seed=0),
        1: _layer_with_weak_experts(make_layer, 1, (1, 4, 6), seed=1),
        2: _layer_with_weak_experts(make_layer, 2, (), seed=2, tokens=96),
    }
    plan = get_method("global_soft_activation")().plan(stats, make_limits(stats), Budget(ratio=0.125))
    # Reference: sort every (share, layer, expert) of the model and take the lowest 3.
    shares = sorted(
        (float(s.token_logits.softmax(-1).sum(0)[e]) / s.num_tokens, layer, e)
        for layer, s in stats.items()
        for e in range(8)
    )
    expected = {(layer, e) for _, layer, e in shares[:3]}
    removed = {(l, e) for l in stats for e in range(8) if e not in plan.keep[l]}
    assert removed == expected == {(1, 1), (1, 4), (1, 6)}
    assert plan.info["removed_per_layer"] == {0: 0, 1: 3, 2: 0}
    assert plan.scores[2] == pytest.approx((stats[2].soft_mass / 96).tolist())


def test_min_keep_caps_a_layer_and_the_rest_comes_from_elsewhere(make_layer, make_limits):
    stats = {
        0: _layer_with_weak_experts(make_layer, 0, (), seed=4),
        1: _layer_with_weak_experts(make_layer, 1, range(7), seed=5),
    }
    plan = get_method("global_soft_activation")().plan(stats, make_limits(stats), Budget(ratio=0.5))
    assert plan.info["removed_per_layer"] == {0: 2, 1: 6}
    assert len(plan.keep[1]) == 2 and 7 in plan.keep[1]
    with pytest.raises(BudgetError, match="at most 12"):
        get_method("global_soft_activation")().plan(stats, make_limits(stats), Budget(keep_experts=1))


def test_grouped_layer_removes_one_per_group_per_step(make_layer):
    spec = RoutingSpec(top_k=2, n_group=2, topk_group=1)
    stats, _ = make_layer(8, spec=spec, seed=6)
    stats.token_logits[:, [0, 1, 2]] -= 4.0  # all weak experts in group 0
    stats.soft_mass = stats.token_logits.softmax(-1).sum(0)
    other = _layer_with_weak_experts(make_layer, 1, (), seed=7)
    limits = {0: LayerLimits(8, 4, n_group=2), 1: LayerLimits(8, 2)}
    plan = get_method("global_soft_activation")().plan({0: stats, 1: other}, limits, Budget(ratio=0.25))
    kept = plan.keep[0]
    assert sum(e < 4 for e in kept) == sum(e >= 4 for e in kept)
    assert plan.info["removed_per_layer"][0] in (2, 4)
    assert sum(plan.info["removed_per_layer"].values()) == 4


def test_merge_mode_fills_merge_targets(make_layer, make_limits):
    stats = {l: _layer_with_weak_experts(make_layer, l, (l,), seed=l) for l in range(2)}
    plan = get_method("global_soft_activation")(merge=True).plan(
        stats, make_limits(stats), Budget(keep_experts=6)
    )
    for layer, targets in plan.merge_into.items():
        assert set(targets) == set(range(8)) - set(plan.keep[layer])
        assert set(targets.values()) <= set(plan.keep[layer])
    assert torch.tensor([len(k) for k in plan.keep.values()]).sum() == 12
