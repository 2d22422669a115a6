"""grape_paper: the transcribed Algorithm 1 against an obvious re-implementation from outputs.

The reference works on the expert outputs themselves (S, E, H), never on Gram matrices: a
cluster's output is the explicit frequency-weighted average of its members' outputs, the
similarity is computed from the flattened outputs, and every step rescans every layer.
"""

from __future__ import annotations

import math

import pytest
import torch

from grape.budget import Budget, LayerLimits
from grape.methods import get_method

TWINS = {1: 0, 3: 2, 5: 4, 7: 6}


def _similarity(a: torch.Tensor, b: torch.Tensor, kind: str) -> float:
    a, b = a.flatten(), b.flatten()
    if kind == "cosine":
        return float(a @ b / (a.norm() * b.norm()))
    return 1.0 - float((a - b).square().sum() / (a.square().sum() + b.square().sum()))


def _naive(layers: dict, total: int, *, min_keep: int, gamma: float, kind: str, merge: bool):
    """Reference trace [(layer, kept, removed members)] and final clusters per layer."""
    state = {}
    for layer, (stats, outputs) in layers.items():
        freq = stats.freq.double()
        state[layer] = [
            {"rep": e, "members": [e], "out": outputs[:, e].clone(), "freq": float(freq[e])}
            for e in range(outputs.shape[1])
        ]

    def entropy() -> float:
        counts = [len(c) for c in state.values()]
        return -sum(n / sum(counts) * math.log(n / sum(counts)) for n in counts)

    floor = entropy() * (1 - gamma)
    frozen: set[int] = set()
    trace = []
    for _ in range(total):
        open_layers = [l for l in sorted(state) if len(state[l]) > min_keep]
        active = [l for l in open_layers if l not in frozen] or open_layers
        if not [l for l in open_layers if l not in frozen]:
            frozen.clear()
        redundancy = {}
        for l in active:
            clusters = state[l]
            redundancy[l] = sum(
                _similarity(a["out"], b["out"], kind)
                for i, a in enumerate(clusters)
                for j, b in enumerate(clusters)
                if i != j
            )
        chosen = max(active, key=lambda l: (redundancy[l], -l))
        clusters = state[chosen]
        pairs = [
            (_similarity(clusters[i]["out"], clusters[j]["out"], kind), -i, -j)
            for i in range(len(clusters))
            for j in range(i + 1, len(clusters))
        ]
        _, i, j = max(pairs)
        a, b = clusters[-i], clusters[-j]
        keep, gone = (a, b) if (a["freq"], -a["rep"]) >= (b["freq"], -b["rep"]) else (b, a)
        if merge:
            members = keep["members"] + gone["members"]
            freq = layers[chosen][0].freq.double()[members].clamp_min(1e-6)
            outputs = layers[chosen][1]
            keep["out"] = (outputs[:, members] * (freq / freq.sum()).view(1, -1, 1)).sum(1)
            keep["members"] = sorted(members)
            keep["freq"] += gone["freq"]
        clusters.remove(gone)
        trace.append((chosen, keep["rep"], sorted(gone["members"])))
        if entropy() < floor:
            frozen.add(chosen)
    return trace, state


def _model(make_layer, num_layers: int = 3, **kwargs) -> dict:
    return {
        layer: make_layer(8, tokens=40, seed=300 + layer, layer=layer, **kwargs)
        for layer in range(num_layers)
    }


def _plan(layers, make_limits, **kwargs):
    stats = {layer: s for layer, (s, _) in layers.items()}
    budget = Budget(**{k: kwargs.pop(k) for k in ("ratio", "keep_experts") if k in kwargs})
    return get_method("grape_paper")(**kwargs).plan(stats, make_limits(stats), budget)


@pytest.mark.parametrize(
    ("kind", "merge", "gamma"),
    [("cosine", False, 0.05), ("mse", False, 0.0), ("cosine", True, 0.0), ("mse", True, 0.05)],
)
def test_trace_matches_the_naive_algorithm(kind, merge, gamma, make_layer, make_limits):
    scale = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.3, 1.5, 1.0, 0.8])
    layers = _model(make_layer, out_scale=scale)
    layers[1] = make_layer(8, tokens=40, seed=5, layer=1, copies={3: 1, 6: 2})
    plan = _plan(layers, make_limits, ratio=0.5, similarity=kind, merge=merge, gamma=gamma)
    expected, clusters = _naive(layers, 12, min_keep=2, gamma=gamma, kind=kind, merge=merge)
    got = [(t["layer"], t["kept"], t["removed"]) for t in plan.info["trace"]]
    assert got == expected
    for layer, state in clusters.items():
        assert plan.keep[layer] == sorted(c["rep"] for c in state)
        expected_merges = {m: c["rep"] for c in state for m in c["members"] if m != c["rep"]}
        assert plan.merge_into[layer] == (expected_merges if merge else {})


def test_identical_experts_merge_first_and_the_busier_one_stays(make_layer, make_limits):
    layers = _model(make_layer)
    layers[2] = make_layer(8, tokens=40, seed=9, layer=2, copies={6: 3})
    plan = _plan(layers, make_limits, ratio=0.125)
    stats = layers[2][0]
    first = plan.info["trace"][0]
    assert first["layer"] == 2 and {first["kept"], *first["removed"]} == {3, 6}
    assert first["similarity"] == pytest.approx(1.0, abs=1e-12)
    busier = 3 if (float(stats.freq[3]), -3) >= (float(stats.freq[6]), -6) else 6
    assert first["kept"] == busier
    assert plan.scores[2][3] == plan.scores[2][6] == pytest.approx(1.0, abs=1e-12)


def test_gamma_zero_makes_layers_take_turns_and_a_loose_gamma_follows_redundancy(make_layer, make_limits):
    layers = _model(make_layer, num_layers=4)
    layers[1] = make_layer(8, tokens=40, seed=3, layer=1, copies=TWINS)
    turns = _plan(layers, make_limits, ratio=0.25, gamma=0.0)
    # Any merge that leaves the counts unequal lowers the entropy below E0 and freezes its layer
    # (one that makes them equal again does not), so the layers take turns.
    trace = turns.info["trace"]
    assert [t["frozen"] for t in trace] == [t["entropy_ratio"] < 1 - 1e-12 for t in trace]
    assert sum(t["frozen"] for t in trace) == turns.info["freezes"] == 6
    assert sorted(turns.info["removed_per_layer"].values()) == [2, 2, 2, 2]
    assert turns.info["unfreezes"] == 1
    free = _plan(layers, make_limits, ratio=0.25, gamma=0.99)
    assert free.info["freezes"] == 0
    # The layer of twins has by far the largest redundancy and takes most of the budget.
    assert free.info["removed_per_layer"][1] > 2


def test_min_keep_and_group_balance_are_respected(make_layer):
    from grape_kernels.routing import RoutingSpec

    spec = RoutingSpec(top_k=2, n_group=2, topk_group=1)
    redundant, _ = make_layer(8, tokens=40, seed=1, layer=0, spec=spec, copies=TWINS)
    other, _ = make_layer(8, tokens=40, seed=2, layer=1, spec=spec)
    limits = {0: LayerLimits(8, 4, n_group=2), 1: LayerLimits(8, 4, n_group=2)}
    plan = get_method("grape_paper")(gamma=0.99).plan({0: redundant, 1: other}, limits, Budget(ratio=0.5))
    assert plan.info["removed_per_layer"] == {0: 4, 1: 4}
    for kept in plan.keep.values():
        assert sum(e < 4 for e in kept) == sum(e >= 4 for e in kept) == 2
    # Pairs are merged inside a group only.
    assert all((t["kept"] < 4) == all(r < 4 for r in t["removed"]) for t in plan.info["trace"])


def test_bad_options_are_refused(make_layer, make_limits):
    with pytest.raises(ValueError, match="similarity must be one of"):
        get_method("grape_paper")(similarity="cka")
    with pytest.raises(ValueError, match="gamma must be in"):
        get_method("grape_paper")(gamma=1.0)
    with pytest.raises(ValueError, match="unknown option"):
        get_method("grape_paper")(entropy_floor=0.5)
