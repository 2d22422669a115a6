"""``grape``: Global Redundancy-Aware Pruning of Experts.

Removes the experts that other experts can stand in for, spending one budget over the whole
model where that is cheapest, with a guard against piling the whole budget into a few layers.
Every choice below is a default the lead can measure against its alternative (options in
brackets).

**State of a layer.** Each kept expert k is a coefficient vector over the layer's original
experts (row k of M, K x E; the identity at the start), so its output on sampled token t is
o_k(t) = sum_i M_ki o_i(t) and every inner product follows from the stored token Grams:
<o_a(t), o_b(t)> = M_a G_t M_b^T. The per-token traffic W (S x K) starts as the unpruned
layer's dense routing weights, so the layer output on token t is sum_k W_tk o_k(t). (Clusters
partition the original experts, so M is stored as each original's cluster and weight.)

**Cost of removing e** [``cost="substitution"``, default]. e is replaced by its nearest kept
neighbour n, which takes over e's tokens with e's weights; the layer output on token t moves by
W_te (o_n(t) - o_e(t)), so the cost is

    sum_t W_te^2 ||o_e(t) - o_n(t)||^2  /  (S_l * mean residual-stream energy per token)

**Comparable across layers** [``normaliser="model"``, default]. The denominator is one scale for
the whole model: the mean over every MoE layer's sampled tokens of ||residual stream entering
the block||^2 (the statistics' ``token_resid_sq``), times the layer's sample count S_l. Costs
are then absolute perturbations of the residual stream in units of its typical energy. Why one scale rather than each layer's own
residual energy (``normaliser="layer"``, relative perturbations): a layer's output is *added*
to the residual stream and carried to the final norm, which divides every layer's
contribution by the same final stream norm, so a perturbation costs the same wherever it
enters. Per-layer normalisation instead inflates the costs of early layers, whose stream is
still small (the embedding), and on the trained test model made GRAPE refuse to prune layer 0
at all; the model-wide scale gave lower perplexity at both 25% and 50% budgets (README).
Dividing by the layer's own *output* energy would rate every layer as equally important.
Two identical experts cost exactly 0 whatever top_k is (no re-routing assumption enters), and so
does an expert no sampled token is routed to. The distance is computed as
G_ee + G_nn - 2 G_en per token *before* weighting, so equal Gram entries give an exact 0.
The cost is incremental: the perturbation of the layer's current (already pruned) output, not
the error against the unpruned layer, so cross terms between two removals in one layer are
ignored; ``cost="reroute"`` (below) is the cumulative, exact alternative.

**Nearest neighbour.** n(e) = the kept expert minimising that cost. Ties (e.g. e is never routed,
so every n costs 0) go to the smallest unweighted output distance sum_t ||o_e - o_n||^2 (the
neighbour that is really most similar, which matters when e is merged), then the lowest index.
In group-limited layers n is taken from e's own group: the router picks groups first, so e's
tokens stay in its group, and it makes the per-group removals of one step independent.

**Global greedy.** Every layer offers its cheapest removal; the globally cheapest is applied,
then only that layer is updated: n inherits e's traffic (W[:, n] += W[:, e]) and e is deleted,
so removing n later costs what dropping the pair's tokens costs. Only n's row of the cost
matrix changes, an O(S K) refresh.

**Merge mode** (``merge=True``) plans exactly like drop mode and then merges every removed
expert into the substitute that took over its tokens (chains resolved to the kept expert);
:mod:`grape.merge` then refits the substitute's down projection to its group's outputs (or,
with ``--merge-fit average``, the surgery averages their weights by routed-token frequency).
The plan deliberately does *not* model the merged expert's output as the frequency-weighted
average of the members' outputs: an average of *weights* is not an average of *outputs* for a
nonlinear expert, and modelling it as one makes a merged cluster (whose averaged output is
smaller than either member's) look like a cheap substitute for still more experts, so clusters
snowball (measured: README, "Measured choices").
A grouped layer (n_group > 1) removes the cheapest expert of every group in one step, so every
group keeps the same count; min_keep bounds the number of steps per layer. The step is ranked
by its cost *per removed expert* (the summed cost / n_group): with one n_group for the whole
model (every real architecture) that orders steps exactly as the summed cost does, and in a
model mixing grouped and ungrouped layers it compares a step with the single removals it
displaces rather than penalising grouped layers n_group-fold.
A layer's sequence of cheapest steps depends only on its own state, so each layer computes its
sequence lazily (only as far as the global greedy asks) and :func:`grape.budget.allocate_greedy`
merges the sequences. This is the same result as running the greedy over all layers at once,
and it makes a restart (below) a cheap re-merge instead of a recomputation.

**Entropy guard.** With r_l the removals of layer l and p_l = r_l / R, the allocation is accepted
when H(p) / log(L) >= ``entropy_floor`` (default 0.5) and max_l p_l <= ``max_layer_share``
(default 0.5), L counting the layers that can lose an expert at all. exp(H) is the effective
number of layers the budget is spread over, so a floor of 0.5 demands at least sqrt(L) of them
(7 of 48 layers, 3 of 8): it stops collapse into a handful of layers while leaving room for
strongly ragged allocations (uniform is 1.0). The share bound catches the case entropy misses:
one layer taking half the budget while the rest is spread thinly. Otherwise GRAPE *restarts*:
the most loaded layer (ties: the one whose last removal was dearest, then the lowest index) is
capped at one step fewer than it took, caps persist, and the greedy reruns from scratch. Caps
only go down, so this ends; when lowering one more cap would make the budget unreachable, the
thresholds cannot be met: the capped layers fall back to their uniform-budget counts as caps
(or, if even that cannot reach the total, the guard is switched off), and ``info["guard"]``
says so. Set ``entropy_floor=0`` and ``max_layer_share=1`` to disable the guard.

**Alternative cost** [``cost="reroute"``, drop mode only]: the exact increase of the layer-output
error when e is removed and the pruned router re-routes its tokens (token Grams with
``dense_routing_weights(..., keep=mask)``), with the same normaliser. It needs one routing per
candidate per step (O(K) routings instead of an O(S K) refresh), so it is much slower on wide
layers; merge mode changes outputs, which re-routing alone does not model, hence drop only.

How fast each cost is on a 48-layer, 128-expert model is measured in the README.

``scores`` holds each expert's cost in the unpruned layer; ``info`` the greedy ``trace`` (layer,
expert, cost, substitute, merged_into per removal in order), the guard's restarts, caps and
final entropy. Everything is deterministic: same statistics and options, same plan.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from grape.budget import Budget, BudgetError, LayerLimits, allocate_greedy
from grape.methods.base import ExpertPruningMethod, Selection, register
from grape.methods.reconstruction import ReroutingError, residual_energy
from grape.stats import LayerStats
from grape_kernels.routing import dense_routing_weights

__all__ = ["GRAPEMethod"]

_TOKEN_CHUNK_ELEMENTS = 1 << 22  # bounds the (tokens, E, E) distance block built at start


@dataclass(frozen=True)
class _Step:
    """One removal step of a layer: one expert per group, with what stands in for each."""

    experts: tuple[int, ...]
    substitutes: tuple[int | None, ...]
    expert_costs: tuple[float, ...]
    cost: float


class _SubstitutionLayer:
    """A layer's lazily computed sequence of cheapest substitution steps (see module docs)."""

    def __init__(self, stats: LayerStats, lim: LayerLimits, energy: tuple[float, str]) -> None:
        num = lim.num_experts
        self.step_size = lim.n_group
        self.max_steps = lim.max_removals // lim.n_group
        self.energy, self.normaliser = energy
        self.ids = torch.arange(num)
        self.group = torch.arange(num) // (num // lim.n_group)
        self.gram = stats.token_gram.double()
        self.traffic = dense_routing_weights(stats.token_logits, stats.spec).double()
        self.weight = self.traffic.square()
        self.self_sq = self.gram.diagonal(dim1=1, dim2=2).clone()
        self.costs, summed = self._initial_costs()
        # Unweighted distances sum_t ||o_e - o_n||^2 (tie-breaks only), from the summed Grams.
        diag = summed.diagonal()
        self.distance = diag.unsqueeze(0) + diag.unsqueeze(1) - 2 * summed
        best, _ = self._neighbours()
        if not torch.isfinite(best[best != math.inf]).all():
            raise ValueError(f"layer {stats.layer}: statistics give non-finite GRAPE costs")
        self.scores = [float(c) / self.energy if math.isfinite(c) else None for c in best.tolist()]
        self.steps: list[_Step] = []

    def _initial_costs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, E) costs C[e, n] = sum_t W_te^2 (G_t,ee + G_t,nn - 2 G_t,en), unnormalised, and
        the Grams summed over the sampled tokens.

        The per-token distance is built as one batched ``baddbmm`` (-2 G_t + [sq, 1] @ [1; sq]),
        token chunk by chunk: a single fused pass over the Grams, and exactly 0 for experts with
        equal Gram entries (-2x + (x + x) has no rounding), which a sum of separately reduced
        terms would not give.
        """
        tokens, num = self.traffic.shape
        costs = torch.zeros(num, num, dtype=torch.float64)
        summed = torch.zeros(num, num, dtype=torch.float64)
        chunk = max(1, _TOKEN_CHUNK_ELEMENTS // max(num * num, 1))
        for start in range(0, tokens, chunk):
            part = slice(start, start + chunk)
            sq = self.self_sq[part]
            ones = torch.ones_like(sq)
            dist = torch.baddbmm(
                self.gram[part], torch.stack([sq, ones], 2), torch.stack([ones, sq], 1), beta=-2
            )
            costs += torch.einsum("te,ten->en", self.weight[part], dist)
            summed += self.gram[part].sum(0)
        return costs.clamp_min_(0), summed

    def _neighbours(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each kept expert's cheapest substitution cost and the neighbour achieving it."""
        allowed = self.group.unsqueeze(0) == self.group.unsqueeze(1)
        allowed.fill_diagonal_(False)
        costs = self.costs.masked_fill(~allowed, math.inf)
        best = costs.min(dim=1).values
        tied = self.distance.masked_fill(~allowed | (costs > best.unsqueeze(1)), math.inf)
        return best, tied.argmin(dim=1)

    def cost(self, step: int) -> float:
        while len(self.steps) <= step:
            self._advance()
        return self.steps[step].cost

    def _advance(self) -> None:
        best, neighbour = self._neighbours()
        chosen: list[tuple[int, int]] = []
        for group in range(self.step_size):
            members = (self.group == group).nonzero().flatten()
            pos = int(members[best[members].argmin()]) if self.step_size > 1 else int(best.argmin())
            chosen.append((pos, int(neighbour[pos])))
        costs = tuple(float(best[e]) / self.energy for e, _ in chosen)
        self.steps.append(
            _Step(
                experts=tuple(int(self.ids[e]) for e, _ in chosen),
                substitutes=tuple(int(self.ids[n]) for _, n in chosen),
                expert_costs=costs,
                cost=sum(costs) / len(costs),
            )
        )
        for e, n in chosen:
            self.traffic[:, n] += self.traffic[:, e]
            self.weight[:, n] = self.traffic[:, n].square()
        survives = torch.ones(len(self.ids), dtype=torch.bool)
        survives[[e for e, _ in chosen]] = False
        index = survives.nonzero().flatten()
        self.traffic = self.traffic[:, index]
        self.weight = self.weight[:, index]
        self.self_sq = self.self_sq[:, index]
        self.costs = self.costs[index][:, index]
        self.distance = self.distance[index][:, index]
        self.group = self.group[index]
        self.ids = self.ids[index]
        for substitute in self.steps[-1].substitutes:
            self._refresh(int((self.ids == substitute).nonzero()))

    def _refresh(self, n: int) -> None:
        """Recompute the costs of kept expert ``n`` after it took over another's traffic."""
        cross = self.gram[:, self.ids[n]].index_select(1, self.ids)
        dist = cross.mul(-2).add_(self.self_sq).add_(self.self_sq[:, n : n + 1])
        self.costs[n] = (self.weight[:, n] @ dist).clamp_min(0)


class _ReroutingLayer:
    """A layer's lazily computed sequence of cheapest steps under the exact re-routing error."""

    def __init__(self, stats: LayerStats, lim: LayerLimits, energy: tuple[float, str]) -> None:
        self.lim = lim
        self.step_size = lim.n_group
        self.max_steps = lim.max_removals // lim.n_group
        self.energy, self.normaliser = energy
        self.error = ReroutingError(stats)
        self.keep = torch.ones(lim.num_experts, dtype=torch.bool)
        self.current = 0.0
        self.scores = [0.0] * lim.num_experts
        self.steps: list[_Step] = []

    def cost(self, step: int) -> float:
        while len(self.steps) <= step:
            self._advance()
        return self.steps[step].cost

    def _advance(self) -> None:
        chosen: list[int] = []
        errors: dict[int, float] = {}
        for members in self.lim.groups():
            for e in (e for e in members if self.keep[e]):
                keep = self.keep.clone()
                keep[e] = False
                errors[e] = self.error(keep)
            candidates = [e for e in members if self.keep[e]]
            chosen.append(min(candidates, key=lambda e: (errors[e], e)))
        if not self.steps:
            for e, error in errors.items():
                self.scores[e] = (error - self.current) / self.energy
        self.keep[chosen] = False
        error = errors[chosen[0]] if len(chosen) == 1 else self.error(self.keep)
        self.steps.append(
            _Step(
                experts=tuple(chosen),
                substitutes=(None,) * len(chosen),
                expert_costs=tuple((errors[e] - self.current) / self.energy for e in chosen),
                cost=(error - self.current) / self.energy / len(chosen),
            )
        )
        self.current = error


@register
class GRAPEMethod(ExpertPruningMethod):
    """Global greedy removal of redundant experts with an entropy guard (see module docs)."""

    name = "grape"
    is_global = True
    default_options = {
        "cost": "substitution",
        "entropy_floor": 0.5,
        "max_layer_share": 0.5,
        "normaliser": "model",
    }

    def __init__(self, *, merge: bool = False, seed: int = 0, **options) -> None:
        super().__init__(merge=merge, seed=seed, **options)
        cost = self.options["cost"]
        if cost not in ("substitution", "reroute"):
            raise ValueError(f"grape cost must be 'substitution' or 'reroute', got {cost!r}")
        if cost == "reroute" and merge:
            raise ValueError("grape cost='reroute' models dropping only; use it without merge")
        if self.options["normaliser"] not in ("model", "layer"):
            raise ValueError(f"normaliser must be 'model' or 'layer', got {self.options['normaliser']!r}")
        if not 0.0 <= self.options["entropy_floor"] < 1.0:
            raise ValueError(
                f"entropy_floor must be in [0, 1), got {self.options['entropy_floor']}"
            )
        if not 0.0 < self.options["max_layer_share"] <= 1.0:
            raise ValueError(
                f"max_layer_share must be in (0, 1], got {self.options['max_layer_share']}"
            )

    def _select(self, stats: Mapping[int, LayerStats], limits: Mapping[int, LayerLimits], budget: Budget) -> Selection:
        total = budget.global_total(limits)
        energy = _energies(stats, self.options["normaliser"])
        if self.options["cost"] == "reroute":
            layers = {l: _ReroutingLayer(stats[l], limits[l], energy[l]) for l in sorted(stats)}
        else:
            layers = {l: _SubstitutionLayer(stats[l], limits[l], energy[l]) for l in sorted(stats)}
        uniform = budget.requested(limits)
        order, guard = self._allocate(layers, total, uniform)

        removed: dict[int, list[int]] = {layer: [] for layer in layers}
        merged: dict[int, dict[int, int]] = {layer: {} for layer in layers}
        trace = []
        for layer, index in order:
            step = layers[layer].steps[index]
            for expert, substitute, cost in zip(step.experts, step.substitutes, step.expert_costs):
                removed[layer].append(expert)
                if self.merge:
                    merged[layer][expert] = substitute
                trace.append(
                    {
                        "layer": layer,
                        "expert": expert,
                        "cost": cost,
                        "substitute": substitute,
                        "merged_into": substitute if self.merge else None,
                    }
                )
        first = layers[min(layers)]
        return Selection(
            removed={layer: sorted(r) for layer, r in removed.items()},
            scores={layer: layers[layer].scores for layer in layers},
            info={
                "cost": self.options["cost"],
                "normaliser": first.normaliser,
                "total_removed": total,
                "guard": guard,
                "trace": trace,
            },
            merge_into={layer: _resolve(chain) for layer, chain in merged.items()}
            if self.merge
            else None,
        )

    def _allocate(
        self, layers: dict, total: int, uniform: dict[int, int]
    ) -> tuple[list[tuple[int, int]], dict]:
        """The greedy allocation with the entropy guard's restarts; returns it and a summary."""
        caps: dict[int, int] = {}
        order = allocate_greedy(layers, total, caps)
        restarts = 0
        relaxed = None
        while (offender := self._offender(order, layers, total)) is not None:
            steps = Counter(layer for layer, _ in order)[offender]
            caps = {**caps, offender: (steps - 1) * layers[offender].step_size}
            try:
                order = allocate_greedy(layers, total, caps)
            except BudgetError:
                caps = {
                    layer: min(uniform[layer], layers[layer].max_steps * layers[layer].step_size)
                    for layer in caps
                }
                try:
                    order = allocate_greedy(layers, total, caps)
                    relaxed = "thresholds unreachable: capped layers capped at uniform counts"
                except BudgetError:
                    caps = {}
                    order = allocate_greedy(layers, total)
                    relaxed = "thresholds unreachable even with uniform caps: guard disabled"
                break
            restarts += 1
        entropy, share = _spread(order, layers, total)
        return order, {
            "entropy_floor": self.options["entropy_floor"],
            "max_layer_share": self.options["max_layer_share"],
            "restarts": restarts,
            "caps": caps,
            "entropy": entropy,
            "max_share": share,
            "relaxed": relaxed,
        }

    def _offender(self, order: list[tuple[int, int]], layers: dict, total: int) -> int | None:
        """The layer to cap if the allocation fails the guard, else None."""
        entropy, share = _spread(order, layers, total)
        if entropy is None:
            return None
        if entropy >= self.options["entropy_floor"] and share <= self.options["max_layer_share"]:
            return None
        steps = Counter(layer for layer, _ in order)
        return max(
            steps,
            key=lambda l: (
                steps[l] * layers[l].step_size,
                layers[l].steps[steps[l] - 1].cost,
                -l,
            ),
        )


def _spread(order: list[tuple[int, int]], layers: dict, total: int) -> tuple[float | None, float]:
    """Normalised entropy of the removals over prunable layers, and the largest layer share.

    The entropy is None when it means nothing: no removals, or fewer than two prunable layers.
    """
    prunable = sum(1 for seq in layers.values() if seq.max_steps > 0)
    steps = Counter(layer for layer, _ in order)
    shares = [steps[l] * layers[l].step_size / total for l in steps] if total else []
    if total == 0 or prunable < 2:
        return None, max(shares, default=0.0)
    entropy = -sum(p * math.log(p) for p in shares if p > 0)
    return entropy / math.log(prunable), max(shares)


def _energies(stats: Mapping[int, LayerStats], normaliser: str) -> dict[int, tuple[float, str]]:
    """Per layer, the energy its costs are divided by (see "Comparable across layers").

    ``"model"``: the model-wide mean residual energy per sampled token, times the layer's
    sample count: one scale for every layer, so costs are absolute perturbations of the
    residual stream. ``"layer"``: the layer's own residual energy (relative perturbations).
    """
    own = {layer: residual_energy(s) for layer, s in stats.items()}
    if normaliser == "layer":
        return {layer: (energy, "layer residual") for layer, energy in own.items()}
    samples = {layer: max(int(s.token_logits.shape[0]), 1) for layer, s in stats.items()}
    per_token = sum(own.values()) / sum(samples.values())
    return {layer: (per_token * samples[layer], "model-mean residual") for layer in stats}


def _resolve(chain: dict[int, int]) -> dict[int, int]:
    """Removed expert -> the kept expert its cluster ended in (merges can be merged again)."""
    final = {}
    for expert, target in chain.items():
        while target in chain:
            target = chain[target]
        final[expert] = target
    return final
