"""``global_soft_activation``: rank router probability mass of all layers together.

The uniform ``soft_activation`` removes the same number everywhere; this baseline spends the same
total where experts carry least router mass, which is what a global criterion without any
notion of redundancy does. Scores are *shares*, soft_mass / num_tokens (an expert's average
router probability), so a layer that saw more tokens does not look more important.

Each layer offers its experts lowest share first (one per group per step in group-limited
layers, the step costing the mean share of its experts, so a grouped step competes with single
removals elsewhere per expert removed), and :func:`grape.budget.allocate_greedy` takes the
globally cheapest steps while every layer keeps its minimum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from grape.budget import Budget, LayerLimits, allocate_greedy
from grape.methods.base import ExpertPruningMethod, Selection, register
from grape.stats import LayerStats


@dataclass
class _RankedLayer:
    """A layer's removal steps in order: step j removes the j-th lowest share of every group."""

    steps: list[list[int]]
    costs: list[float]
    step_size: int

    @property
    def max_steps(self) -> int:
        return len(self.steps)

    def cost(self, step: int) -> float:
        return self.costs[step]


def _ranked(shares: torch.Tensor, lim: LayerLimits) -> _RankedLayer:
    orders = [
        [members[i] for i in torch.sort(shares[members], stable=True).indices.tolist()]
        for members in lim.groups()
    ]
    steps = [
        [order[j] for order in orders] for j in range(lim.max_removals // lim.n_group)
    ]
    return _RankedLayer(steps, [float(shares[s].mean()) for s in steps], lim.n_group)


@register
class GlobalSoftActivationMethod(ExpertPruningMethod):
    """Global budget; lowest average router probability first, across all layers."""

    name = "global_soft_activation"
    is_global = True

    def _select(self, stats: Mapping[int, LayerStats], limits: Mapping[int, LayerLimits], budget: Budget) -> Selection:
        total = budget.global_total(limits)
        shares = {
            layer: s.soft_mass.double() / max(s.num_tokens, 1) for layer, s in stats.items()
        }
        ranked = {layer: _ranked(shares[layer], limits[layer]) for layer in stats}
        removed: dict[int, list[int]] = {layer: [] for layer in stats}
        for layer, step in allocate_greedy(ranked, total):
            removed[layer].extend(ranked[layer].steps[step])
        return Selection(
            removed={layer: sorted(r) for layer, r in removed.items()},
            scores={layer: shares[layer].tolist() for layer in sorted(stats)},
            info={"total_removed": total},
        )
