"""The uniform score-based criteria choose the experts their definitions say, per group."""

from __future__ import annotations

import pytest
import torch

from grape.budget import BudgetError, LayerLimits
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
    plan = get_method(name)().plan(stats, make_limits(stats), ratio=0.25)
    for layer in stats:
        assert _removed(plan, layer) == _lowest(refs[layer][name], 3)
        # Router scores are float32 in the statistics, as in calibration.
        assert plan.scores[layer] == pytest.approx(refs[layer][name].tolist(), rel=1e-6)
        assert plan.merge_into[layer] == {}
    assert plan.info["removed_per_layer"] == {0: 3, 1: 3, 2: 3}


def test_never_routed_expert_is_frequencys_first_choice(make_layer, make_limits):
    stats, _ = make_layer(8, never_routed=(5,), seed=3)
    plan = get_method("frequency")().plan({0: stats}, make_limits({0: stats}), ratio=0.125)
    assert _removed(plan, 0) == [5] and plan.scores[0][5] == 0.0


def test_soft_activation_separates_experts_frequency_cannot(from_outputs, make_limits):
    # Experts 2 and 3 are never in the top-2; 2 is always third, 3 always last. Frequency sees
    # a tie at zero; soft activation knows 2 nearly made it.
    tokens = 32
    logits = torch.randn(tokens, 4) * 0.1
    logits[:, 0] += 6.0
    logits[:, 1] += 5.0
    logits[:, 2] += 4.0
    logits[:, 3] -= 4.0
    outputs = torch.randn(tokens, 4, 6, dtype=torch.float64)
    stats = {0: from_outputs(outputs, logits, RoutingSpec(top_k=2))}
    limits = make_limits(stats)
    assert stats[0].freq[2] == stats[0].freq[3] == 0
    plan = get_method("soft_activation")().plan(stats, limits, keep_experts=3)
    assert plan.keep[0] == [0, 1, 2]


def test_reap_keeps_a_rare_but_decisive_expert_that_ean_drops(from_outputs, make_limits):
    # Expert 3 is routed on 2 tokens only but with a large output; expert 1 is routed often
    # with a small output. EAN (a sum) drops 3, REAP (a mean, gate-weighted) drops 1.
    tokens = 64
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, 4, generator=gen)
    logits[:, 3] = -20.0
    logits[:2, 3] = 20.0
    outputs = torch.randn(tokens, 4, 6, generator=gen, dtype=torch.float64)
    outputs[:, 3] *= 3.0
    outputs[:, 1] *= 0.5
    stats = {0: from_outputs(outputs, logits, RoutingSpec(top_k=1))}
    limits = make_limits(stats)
    assert get_method("ean")().plan(stats, limits, keep_experts=3).keep[0] == [0, 1, 2]
    assert get_method("reap")().plan(stats, limits, keep_experts=3).keep[0] == [0, 2, 3]


def test_grouped_layers_lose_the_lowest_of_each_group(make_layer):
    spec = RoutingSpec(top_k=2, n_group=2, topk_group=2)
    stats, outputs = make_layer(8, tokens=64, spec=spec, seed=9)
    limits = {0: LayerLimits(8, 2, n_group=2)}
    plan = get_method("soft_activation")().plan({0: stats}, limits, ratio=0.5)
    mass = stats.token_logits.softmax(-1).sum(0)
    expected = _lowest(mass[:4], 2) + [4 + e for e in _lowest(mass[4:], 2)]
    assert _removed(plan, 0) == expected


def test_random_is_reproducible_by_seed_and_differs_across_seeds(make_layer, make_limits):
    stats = {layer: make_layer(16, seed=layer, layer=layer)[0] for layer in range(4)}
    limits = make_limits(stats)
    plans = {s: get_method("random")(seed=s).plan(stats, limits, ratio=0.5) for s in (0, 1)}
    again = get_method("random")(seed=0).plan(stats, limits, ratio=0.5)
    assert again.keep == plans[0].keep
    assert plans[0].keep != plans[1].keep
    assert all(len(k) == 8 for k in plans[0].keep.values())


@pytest.mark.parametrize("name", ["frequency", "ean", "random"])
def test_merge_targets_are_the_most_similar_kept_expert(name, make_layer, make_limits):
    stats, outputs = {}, {}
    for layer in range(2):
        stats[layer], outputs[layer] = make_layer(8, tokens=40, seed=20 + layer, layer=layer)
    plan = get_method(name)(merge=True).plan(stats, make_limits(stats), ratio=0.5)
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
        get_method("ean")().plan(stats, make_limits(stats), ratio=0.9)
    with pytest.raises(ValueError, match="limits cover"):
        get_method("ean")().plan(stats, {1: LayerLimits(8, 2)}, ratio=0.5)
    with pytest.raises(ValueError, match="limits say 16"):
        get_method("ean")().plan(stats, {0: LayerLimits(16, 2)}, ratio=0.5)

