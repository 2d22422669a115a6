"""``frequency``: an expert no token is routed to goes first."""

from __future__ import annotations

from grape.budget import Budget
from grape.methods import get_method


def _removed(plan, layer):
    return sorted(set(range(len(plan.scores[layer]))) - set(plan.keep[layer]))


def test_never_routed_expert_is_frequencys_first_choice(make_layer, make_limits):
    stats, _ = make_layer(8, never_routed=(5,), seed=3)
    plan = get_method("frequency")().plan({0: stats}, make_limits({0: stats}), Budget(ratio=0.125))
    assert _removed(plan, 0) == [5] and plan.scores[0][5] == 0.0
