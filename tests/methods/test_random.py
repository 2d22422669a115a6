"""``random``: reproducible by seed, different across seeds."""

from __future__ import annotations

from grape.budget import Budget
from grape.methods import get_method


def test_random_is_reproducible_by_seed_and_differs_across_seeds(make_layer, make_limits):
    stats = {layer: make_layer(16, seed=layer, layer=layer)[0] for layer in range(4)}
    limits = make_limits(stats)
    plans = {s: get_method("random")(seed=s).plan(stats, limits, Budget(ratio=0.5)) for s in (0, 1)}
    again = get_method("random")(seed=0).plan(stats, limits, Budget(ratio=0.5))
    assert again.keep == plans[0].keep
    assert plans[0].keep != plans[1].keep
    assert all(len(k) == 8 for k in plans[0].keep.values())
