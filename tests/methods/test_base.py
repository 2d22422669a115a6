"""The shared base of expert-pruning methods: uniform score methods drop their lowest scores in
every layer (and group), merge targets are the most similar kept expert, the registry and the
checks before any work."""

from __future__ import annotations

import pytest
import torch

from grape.budget import Budget, BudgetError, LayerLimits
from grape.methods import available_methods, get_method
from grape_kernels.routing import RoutingSpec, route


def _removed(plan, layer):
    return sorted(set(range(len(plan.scores[layer]))) - set(plan.keep[layer]))


def _lowest(values: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.argsort(values)[:count].tolist())


def _references(outputs: torch.Tensor, logits: torch.Tensor, spec: RoutingSpec) -> dict:
    """Each criterion recomputed from the outputs and the routing, token by token."""
    ids, weights = route(logits, spec)
    num = outputs.shape[1]
    count = torch.zeros(num, dtype=torch.float64)
    norm_sum = torch.zeros(num, dtype=torch.float64)
    gated_sum = torch.zeros(num, dtype=torch.float64)
    for t in range(outputs.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t].tolist()):
            count[e] += 1
            norm_sum[e] += outputs[t, e].norm()
            gated_sum[e] += w * outputs[t, e].norm()
    return {
        "frequency": count,
        "soft_activation": logits.double().softmax(-1).sum(0),
        "ean": norm_sum,
        "reap": torch.where(count > 0, gated_sum / count.clamp_min(1), 0.0),
    }


@pytest.mark.parametrize("name", ["frequency", "soft_activation", "ean", "reap"])
def test_criterion_drops_its_lowest_scores_on_every_layer(name, make_layer, make_limits):
    stats, refs = {}, {}
    for layer in range(3):
        scale = torch.rand(12, generator=torch.Generator().manual_seed(layer)) + 0.1
        stats[layer], outputs = make_layer(12, tokens=64, seed=layer, layer=layer, out_scale=scale)
        refs[layer] = _references(outputs, stats[layer].token_logits.float(), stats[layer].spec)
    plan = get_method(name)().plan(stats, make_limits(stats), Budget(ratio=0.25))
    for layer in stats:
        assert _removed(plan, layer) == _lowest(refs[layer][name], 3)
        # Router scores are float32 in the statistics, as in calibration.
        assert plan.scores[layer] == pytest.approx(refs[layer][name].tolist(), rel=1e-6)
        assert plan.merge_into[layer] == {}
    assert plan.info["removed_per_layer"] == {0: 3, 1: 3, 2: 3}


def test_grouped_layers_lose_the_lowest_of_each_group(make_layer):
    spec = RoutingSpec(top_k=2, n_group=2, topk_group=2)
    stats, outputs = make_layer(8, tokens=64, spec=spec, seed=9)
    limits = {0: LayerLimits(8, 2, n_group=2)}
    plan = get_method("soft_activation")().plan({0: stats}, limits, Budget(ratio=0.5))
    mass = stats.token_logits.softmax(-1).sum(0)
    expected = _lowest(mass[:4], 2) + [4 + e for e in _lowest(mass[4:], 2)]
    assert _removed(plan, 0) == expected


@pytest.mark.parametrize("name", ["frequency", "ean", "random"])
def test_merge_targets_are_the_most_similar_kept_expert(name, make_layer, make_limits):
    stats, outputs = {}, {}
    for layer in range(2):
        stats[layer], outputs[layer] = make_layer(8, tokens=40, seed=20 + layer, layer=layer)
    plan = get_method(name)(merge=True).plan(stats, make_limits(stats), Budget(ratio=0.5))
    for layer, targets in plan.merge_into.items():
        flat = outputs[layer].permute(1, 0, 2).reshape(8, -1)
        cosine = torch.nn.functional.cosine_similarity(flat.unsqueeze(1), flat.unsqueeze(0), dim=-1)
        assert sorted(targets) == _removed(plan, layer)
        for removed, target in targets.items():
            kept = plan.keep[layer]
            assert target == kept[int(cosine[removed, kept].argmax())]


def test_registry_lists_all_methods_and_rejects_unknown_names_and_options():
    assert available_methods() == sorted(
        ["random", "frequency", "soft_activation", "ean", "reap", "naee",
         "global_soft_activation", "grape", "grape_paper"]
    )
    assert not get_method("frequency").is_global and get_method("grape").is_global
    with pytest.raises(ValueError, match="available: ean, frequency"):
        get_method("magnitude")
    with pytest.raises(ValueError, match="unknown option"):
        get_method("frequency")(beam_width=3)


def test_budget_and_input_errors_come_before_any_work(make_layer, make_limits):
    stats = {0: make_layer(8)[0]}
    with pytest.raises(BudgetError, match="layer 0 has 8 experts and must keep at least 2"):
        get_method("ean")().plan(stats, make_limits(stats), Budget(ratio=0.9))
    with pytest.raises(ValueError, match="limits cover"):
        get_method("ean")().plan(stats, {1: LayerLimits(8, 2)}, Budget(ratio=0.5))
    with pytest.raises(ValueError, match="limits say 16"):
        get_method("ean")().plan(stats, {0: LayerLimits(16, 2)}, Budget(ratio=0.5))
