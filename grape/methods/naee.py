"""``naee`` (Not All Experts are Equal): drop the set of experts whose removal changes the layer's
output least, measured with the exact re-routing of the pruned router.

For every candidate drop set D the error is sum_t ||y_t - y'_t||^2 over the sampled tokens,
where y' routes with D removed (see :mod:`grape.methods.reconstruction`). This is the paper's
criterion; how the drop set is searched:

* exhaustive over all drop sets when there are at most ``exhaustive_limit`` (default 3000) of
  them: Mixtral's C(8, 2) = 28 or C(8, 4) = 70, and any layer up to C(64, 2), is exact;
* otherwise a beam search over single removals: start from nothing removed, extend every
  kept set by one more expert, keep the ``beam_width`` (default 8) lowest-error sets, repeat.
  Width 8 recovers the interactions that plain greedy misses (two experts that are fine to drop
  alone but not together) at 8x greedy's cost: about k * 8 * E routings per layer.

In group-limited layers candidates are group-balanced: the exhaustive search enumerates
products of per-group choices, and the beam takes its i-th removal from group i mod n_group,
so every group loses the same number.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import torch

from grape.budget import Budget, LayerLimits
from grape.methods.base import ExpertPruningMethod, Selection, register
from grape.methods.reconstruction import ReroutingError, residual_energy
from grape.stats import LayerStats


@register
class NAEEMethod(ExpertPruningMethod):
    """Uniform budget; per layer the drop set minimising the exact reconstruction error."""

    name = "naee"
    is_global = False
    default_options = {"exhaustive_limit": 3000, "beam_width": 8}

    def _select(self, stats: Mapping[int, LayerStats], limits: Mapping[int, LayerLimits], budget: Budget) -> Selection:
        removals = budget.per_layer(limits)
        removed: dict[int, list[int]] = {}
        scores: dict[int, list[float]] = {}
        searches: dict[int, dict] = {}
        for layer in sorted(stats):
            error = ReroutingError(stats[layer])
            energy = residual_energy(stats[layer])
            lim = limits[layer]
            drop, err, search = self._search(error, lim, removals[layer])
            removed[layer] = sorted(drop)
            searches[layer] = {**search, "relative_error": err / energy}
            # Report each expert's error when removed alone (0 where the layer cannot lose one).
            scores[layer] = [
                error(_mask(lim.num_experts, (e,))) / energy if lim.max_removals else 0.0
                for e in range(lim.num_experts)
            ]
        return Selection(removed=removed, scores=scores, info={"search": searches})

    def _search(
        self, error: ReroutingError, lim: LayerLimits, count: int
    ) -> tuple[tuple[int, ...], float, dict]:
        """Best drop set of ``count`` experts, its error, and how it was found."""
        if count == 0:
            return (), 0.0, {"kind": "none", "evaluated": 0}
        per_group = count // lim.n_group
        groups = lim.groups()
        combos = math.prod(math.comb(len(g), per_group) for g in groups)
        if combos <= self.options["exhaustive_limit"]:
            per_group_choices = (itertools.combinations(g, per_group) for g in groups)
            drops = (tuple(sorted(itertools.chain(*p))) for p in itertools.product(*per_group_choices))
            err, best = min((error(_mask(lim.num_experts, drop)), drop) for drop in drops)
            return best, err, {"kind": "exhaustive", "evaluated": combos}
        beams: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
        evaluated = 0
        for level in range(count):
            group = groups[level % lim.n_group]
            children = sorted(
                {tuple(sorted(drop + (e,))) for _, drop in beams for e in group if e not in drop}
            )
            evaluated += len(children)
            scored = [(error(_mask(lim.num_experts, drop)), drop) for drop in children]
            beams = sorted(scored)[: self.options["beam_width"]]
        return beams[0][1], beams[0][0], {"kind": "beam", "evaluated": evaluated}


def _mask(num_experts: int, drop: tuple[int, ...]) -> torch.Tensor:
    keep = torch.ones(num_experts, dtype=torch.bool)
    keep[list(drop)] = False
    return keep
