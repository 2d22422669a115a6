"""How many experts each layer loses: budget validation, uniform splits, and the global greedy.

A :class:`Budget` is either a ratio ``R`` of routed experts to remove or a number of experts to
keep per layer. It is checked against each layer's :class:`LayerLimits` *before* calibration,
so an impossible request fails in milliseconds instead of after an hour of forward passes.

Global methods (GRAPE, ``global_soft_activation``) spend the same total as the uniform budget,
but where removals are cheapest. Each layer offers an ordered sequence of removal *steps* (one
expert, or one expert per group in group-limited layers) with a cost per step;
:func:`allocate_greedy` repeatedly takes the globally cheapest next step. Keeping this here, apart
from how the costs are computed, lets both global methods share one exact, capped allocator.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from grape.errors import InputError

__all__ = ["BudgetError", "Budget", "LayerLimits", "StepSequence", "allocate_greedy"]


class BudgetError(InputError):
    """The requested pruning budget cannot be met by a valid model."""


@dataclass(frozen=True)
class LayerLimits:
    """What one MoE layer allows: its expert count and the fewest it may keep.

    Attributes:
        num_experts: routed experts in the layer now.
        min_keep: fewest experts that still route validly (at least top_k; see
            ``MoEAdapter.min_experts`` for group-limited routers).
        n_group: contiguous expert groups of group-limited routing. Removals are balanced across
            groups (every group keeps the same count) so the router's group structure survives.
    """

    num_experts: int
    min_keep: int
    n_group: int = 1

    def __post_init__(self) -> None:
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise BudgetError(
                f"{self.num_experts} experts cannot be split into {self.n_group} equal groups"
            )
        if not 1 <= self.min_keep <= self.num_experts or self.min_keep % self.n_group:
            raise BudgetError(
                f"min_keep={self.min_keep} must be in [1, {self.num_experts}] and a multiple of "
                f"n_group={self.n_group}"
            )

    @property
    def max_removals(self) -> int:
        return self.num_experts - self.min_keep

    def groups(self) -> list[list[int]]:
        """Expert indices of each contiguous group (a single group when routing is not grouped)."""
        size = self.num_experts // self.n_group
        return [list(range(g * size, (g + 1) * size)) for g in range(self.n_group)]


@dataclass(frozen=True)
class Budget:
    """How many routed experts to remove: a ratio of all of them, or a count to keep per layer.

    Exactly one of the two is given, and it is validated here, once, when the value is made
    (the command line turns a ``BudgetError`` into its usage error). Against a model's
    :class:`LayerLimits` it answers both questions a method asks: how many each layer loses
    under the uniform split (:meth:`per_layer`), and how many in total a global method may
    spend anywhere (:meth:`global_total`).
    """

    ratio: float | None = None
    keep_experts: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.keep_experts is None):
            raise BudgetError("give exactly one of an experts ratio or a number of experts to keep")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0):
            raise BudgetError(f"experts ratio must be in (0, 1), got {self.ratio}")
        keep = self.keep_experts
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise BudgetError(f"keep_experts must be at least 1, got {keep}")

    def describe(self) -> str:
        """``"experts ratio 0.25"`` or ``"keep 6 experts per layer"`` (plot titles, messages)."""
        return f"experts ratio {self.ratio:g}" if self.ratio is not None else f"keep {self.keep_experts} experts per layer"

    def requested(self, limits: Mapping[int, LayerLimits]) -> dict[int, int]:
        """Per-layer removals the uniform split asks for, before the per-layer min_keep check.

        Global methods need this unchecked split: their total is its sum, and GRAPE falls back
        to it for layers its entropy guard cannot otherwise settle.
        """
        if not limits:
            raise BudgetError("the model has no MoE layers to prune")
        removals: dict[int, int] = {}
        for layer, lim in limits.items():
            if self.ratio is not None:
                # Round half up, in whole groups, so a grouped layer removes complete group steps.
                groups = (self.ratio * lim.num_experts) / lim.n_group
                removals[layer] = int(math.floor(groups + 0.5)) * lim.n_group
                continue
            if self.keep_experts > lim.num_experts:
                raise BudgetError(
                    f"keep_experts={self.keep_experts} exceeds layer {layer}'s {lim.num_experts} experts"
                )
            if self.keep_experts % lim.n_group:
                raise BudgetError(
                    f"keep_experts={self.keep_experts} is not a multiple of layer {layer}'s "
                    f"n_group={lim.n_group} (every expert group must keep the same count)"
                )
            removals[layer] = lim.num_experts - self.keep_experts
        return removals

    def per_layer(self, limits: Mapping[int, LayerLimits]) -> dict[int, int]:
        """Removals per layer of the uniform budget: round(R * E_l) each, or E_l - K each.

        Raises:
            BudgetError: a layer would keep fewer than its ``min_keep`` experts (named).
        """
        removals = self.requested(limits)
        for layer, count in removals.items():
            lim = limits[layer]
            if lim.num_experts - count < lim.min_keep:
                raise BudgetError(
                    f"layer {layer} has {lim.num_experts} experts and must keep at least "
                    f"{lim.min_keep}, but the budget removes {count} (keeping "
                    f"{lim.num_experts - count})"
                )
        return removals

    def global_total(self, limits: Mapping[int, LayerLimits]) -> int:
        """Total removals of a global budget: the uniform budget's sum, spent anywhere.

        Only the total has to fit: a layer may give fewer experts than the uniform split and
        another more, so the check is against sum(E_l - min_keep_l), not per layer.
        """
        total = sum(self.requested(limits).values())
        room = sum(lim.max_removals for lim in limits.values())
        if total > room:
            raise BudgetError(
                f"the budget removes {total} experts but the layers can give at most {room} while "
                f"each keeps its minimum"
            )
        return total

    def removals(self, limits: Mapping[int, LayerLimits], *, is_global: bool) -> int:
        """The total a method of either kind will remove, refusing a budget that removes none.

        A ratio rounds to whole experts per layer (whole groups in grouped layers), so a small
        ratio can remove nothing at all; pruning would then write a copy of the model and call
        it pruned. This is the check a command makes before calibrating.
        """
        total = self.global_total(limits) if is_global else sum(self.per_layer(limits).values())
        if total > 0:
            return total
        if self.ratio is not None:
            smallest = min(0.5 * lim.n_group / lim.num_experts for lim in limits.values())
            raise BudgetError(
                f"--experts-ratio {self.ratio:g} removes no expert (it rounds to 0 in every layer); "
                f"use a ratio of at least {smallest:.4g}"
            )
        raise BudgetError(
            f"--keep-experts {self.keep_experts} keeps every expert of every layer, so it removes none; "
            "ask to keep fewer"
        )

    def to_json(self) -> dict:
        return {"ratio": self.ratio, "keep_experts": self.keep_experts}


class StepSequence(Protocol):
    """One layer's removal steps in the order it would take them, costed lazily.

    ``cost(j)`` is the cost of the layer's ``j``-th step given its first ``j`` steps were taken;
    it may be computed on demand, so a layer that is never asked for many steps costs little.
    """

    step_size: int
    max_steps: int

    def cost(self, step: int) -> float: ...


def allocate_greedy(
    sequences: Mapping[int, StepSequence],
    total: int,
    caps: Mapping[int, int] | None = None,
) -> list[tuple[int, int]]:
    """Spend exactly ``total`` removals by repeatedly taking the globally cheapest next step.

    Args:
        sequences: layer -> its step sequence.
        total: removals to spend (in experts).
        caps: optional layer -> most experts that layer may lose.

    Returns:
        The steps taken, in order, as (layer, step index).

    A layer whose next step is larger than what remains of the budget is passed over, so
    mixed group sizes never overshoot. Ties go to the lower layer index, so the result is
    deterministic.
    """
    caps = caps or {}
    limit = {
        layer: min(seq.max_steps, caps.get(layer, seq.max_steps * seq.step_size) // seq.step_size)
        for layer, seq in sequences.items()
    }
    heap = [(sequences[layer].cost(0), layer) for layer in sorted(sequences) if limit[layer] > 0]
    heapq.heapify(heap)
    taken = dict.fromkeys(sequences, 0)
    order: list[tuple[int, int]] = []
    remaining = total
    while remaining > 0 and heap:
        _, layer = heapq.heappop(heap)
        seq = sequences[layer]
        if seq.step_size > remaining:
            continue
        order.append((layer, taken[layer]))
        taken[layer] += 1
        remaining -= seq.step_size
        if taken[layer] < limit[layer]:
            heapq.heappush(heap, (seq.cost(taken[layer]), layer))
    if remaining:
        raise BudgetError(
            f"cannot remove exactly {total} experts: {remaining} left over once every layer "
            f"reached its limit"
        )
    return order
