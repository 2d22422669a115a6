"""Budget validation, uniform splits and the exact global greedy allocator."""

from __future__ import annotations

import pytest
import torch

from grape.budget import Budget, BudgetError, LayerLimits, allocate_greedy


def test_uniform_ratio_rounds_per_layer_and_in_whole_groups():
    limits = {
        0: LayerLimits(8, 2),
        3: LayerLimits(60, 4),
        5: LayerLimits(64, 8, n_group=8),
    }
    # 0.3 * 8 = 2.4 -> 2; 0.3 * 60 = 18; 0.3 * 64 = 19.2 -> 2.4 groups -> 2 groups = 16.
    assert Budget(ratio=0.3).per_layer(limits) == {0: 2, 3: 18, 5: 16}
    # Half-up rounding: 0.25 * 10 = 2.5 -> 3.
    assert Budget(ratio=0.25).per_layer({1: LayerLimits(10, 2)}) == {1: 3}


def test_uniform_keep_experts():
    limits = {0: LayerLimits(8, 2), 1: LayerLimits(16, 2)}
    assert Budget(keep_experts=4).per_layer(limits) == {0: 4, 1: 12}


def test_uniform_names_the_layer_that_would_keep_too_few():
    limits = {0: LayerLimits(8, 2), 7: LayerLimits(8, 6)}
    with pytest.raises(BudgetError, match=r"layer 7 has 8 experts and must keep at least 6"):
        Budget(ratio=0.5).per_layer(limits)
    with pytest.raises(BudgetError, match="layer 7"):
        Budget(keep_experts=4).per_layer(limits)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, "0.5"])
def test_ratio_outside_open_interval_is_refused_when_the_budget_is_made(ratio):
    with pytest.raises(BudgetError, match=r"\(0, 1\)"):
        Budget(ratio=ratio)


@pytest.mark.parametrize("keep", [0, -1, True, 2.0])
def test_keep_experts_must_be_a_positive_integer(keep):
    with pytest.raises(BudgetError, match="at least 1"):
        Budget(keep_experts=keep)


def test_exactly_one_budget_and_some_layers_required():
    with pytest.raises(BudgetError, match="exactly one"):
        Budget()
    with pytest.raises(BudgetError, match="exactly one"):
        Budget(ratio=0.5, keep_experts=4)
    with pytest.raises(BudgetError, match="no MoE layers"):
        Budget(ratio=0.5).per_layer({})


def test_keep_experts_must_fit_every_layer_and_its_groups():
    with pytest.raises(BudgetError, match="exceeds layer 1"):
        Budget(keep_experts=12).per_layer({0: LayerLimits(16, 2), 1: LayerLimits(8, 2)})
    with pytest.raises(BudgetError, match="multiple of layer 0's n_group=4"):
        Budget(keep_experts=6).per_layer({0: LayerLimits(16, 4, n_group=4)})


def test_invalid_limits_are_rejected():
    with pytest.raises(BudgetError):
        LayerLimits(10, 2, n_group=4)
    with pytest.raises(BudgetError):
        LayerLimits(8, 9)
    with pytest.raises(BudgetError):
        LayerLimits(8, 2, n_group=4)  # 2 kept cannot be split over 4 groups


def test_global_total_equals_uniform_sum_but_is_checked_only_in_total():
    limits = {0: LayerLimits(8, 2), 1: LayerLimits(8, 7), 2: LayerLimits(16, 2)}
    # Layer 1 cannot give the uniform 4, but the others have room for the total.
    with pytest.raises(BudgetError, match="layer 1"):
        Budget(ratio=0.5).per_layer(limits)
    assert Budget(ratio=0.5).global_total(limits) == 4 + 4 + 8
    assert Budget(ratio=0.5).global_total(limits) == sum(
        Budget(ratio=0.5).requested(limits).values()
    )
    with pytest.raises(BudgetError, match="at most 21"):
        Budget(ratio=0.9).global_total(limits)


def test_a_budget_that_removes_nothing_is_refused_by_name():
    limits = {0: LayerLimits(8, 2), 1: LayerLimits(8, 2)}
    assert Budget(ratio=0.0625).removals(limits, is_global=False) == 2  # 0.5 rounds up
    with pytest.raises(BudgetError, match=r"--experts-ratio 0.01 removes no expert .* at least 0.0625"):
        Budget(ratio=0.01).removals(limits, is_global=True)
    with pytest.raises(BudgetError, match="--keep-experts 8 keeps every expert"):
        Budget(keep_experts=8).removals(limits, is_global=False)
    assert Budget(ratio=0.25).removals(limits, is_global=True) == 4
    assert Budget(ratio=0.25).describe() == "experts ratio 0.25"
    assert Budget(keep_experts=6).describe() == "keep 6 experts per layer"


class _Costs:
    def __init__(self, costs, step_size=1):
        self.costs = costs
        self.step_size = step_size
        self.max_steps = len(costs)
        self.asked = 0

    def cost(self, step):
        self.asked = max(self.asked, step + 1)
        return self.costs[step]


def _brute_force_greedy(costs: dict[int, list[float]], total: int) -> list[tuple[int, int]]:
    """The definition: at each step compare every layer's next cost, take the cheapest."""
    taken = dict.fromkeys(costs, 0)
    order = []
    for _ in range(total):
        heads = [(costs[l][taken[l]], l) for l in sorted(costs) if taken[l] < len(costs[l])]
        _, layer = min(heads)
        order.append((layer, taken[layer]))
        taken[layer] += 1
    return order


def test_allocate_greedy_matches_the_definition_on_random_costs():
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        costs = {
            layer: torch.rand(int(torch.randint(1, 7, (1,), generator=gen)), generator=gen).tolist()
            for layer in range(5)
        }
        total = int(torch.randint(0, sum(map(len, costs.values())) + 1, (1,), generator=gen))
        sequences = {layer: _Costs(c) for layer, c in costs.items()}
        assert allocate_greedy(sequences, total) == _brute_force_greedy(costs, total), trial


def test_allocate_greedy_is_lazy_and_respects_caps():
    sequences = {0: _Costs([0.0, 0.0, 0.0, 0.0]), 1: _Costs([1.0, 2.0, 3.0, 4.0])}
    assert allocate_greedy(sequences, 2) == [(0, 0), (0, 1)]
    assert sequences[1].asked == 1  # only the head of the expensive layer was ever costed
    order = allocate_greedy(sequences, 3, caps={0: 1})
    assert order == [(0, 0), (1, 0), (1, 1)]


def test_allocate_greedy_uses_whole_steps_and_fails_clearly():
    sequences = {0: _Costs([0.0, 0.0], step_size=2), 1: _Costs([1.0, 1.0])}
    # Layer 0's second step (2 experts) does not fit in the last 1: layer 1 takes it.
    assert allocate_greedy(sequences, 3) == [(0, 0), (1, 0)]
    with pytest.raises(BudgetError, match="cannot remove exactly 7"):
        allocate_greedy(sequences, 7)


def test_allocate_greedy_tie_goes_to_lower_layer():
    sequences = {2: _Costs([0.5]), 1: _Costs([0.5])}
    assert allocate_greedy(sequences, 1) == [(1, 0)]
    assert allocate_greedy(sequences, 2) == [(1, 0), (2, 0)]
