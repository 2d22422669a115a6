"""The one interface every expert-pruning method implements, and the shared uniform base.

A method is a pure function from calibration statistics to a :class:`PruningPlan`: which
original experts each layer keeps and, in merge mode, which kept expert absorbs each removed
one. It never touches the model, so methods are cheap to test on hand-made statistics and a
plan can be recomputed for another budget without recalibrating. Surgery (done elsewhere)
turns the plan into a checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from grape.budget import Budget, LayerLimits
from grape.registry import Registry
from grape.stats import LayerStats

__all__ = [
    "PruningPlan",
    "Selection",
    "ExpertPruningMethod",
    "ScoreMethod",
    "register",
    "METHODS",
    "nearest_by_cosine",
    "lowest_per_group",
]


@dataclass
class PruningPlan:
    """What to keep and merge in every layer, plus what the method saw (for the report).

    Attributes:
        keep: layer -> sorted kept original expert indices.
        merge_into: layer -> {removed expert: kept expert it is merged into}; an empty dict per
            layer in drop mode.
        scores: layer -> the per-expert score the method ranked by (json-able).
        info: json-able method details (budget, per-layer removals, GRAPE trace, ...).
    """

    keep: dict[int, list[int]]
    merge_into: dict[int, dict[int, int]]
    scores: dict[int, list[float]]
    info: dict = field(default_factory=dict)


@dataclass
class Selection:
    """A method's raw answer: removed experts per layer, scores, details, optional merge map."""

    removed: dict[int, list[int]]
    scores: dict[int, list[float]]
    info: dict = field(default_factory=dict)
    merge_into: dict[int, dict[int, int]] | None = None


METHODS: Registry[type[ExpertPruningMethod]] = Registry("pruning method", package="grape.methods")
"""Every expert-pruning method, by ``--method`` name; the modules of this package register
themselves (``@register`` in each file), discovered on first lookup."""
register = METHODS.register


class ExpertPruningMethod(ABC):
    """Base of all expert-pruning methods.

    Subclasses set ``name``, ``is_global`` and the options they accept (with defaults) in
    ``default_options``; an unknown option is an error rather than silently ignored, so a typo
    on the command line cannot run a different experiment than the one asked for.
    """

    name: ClassVar[str]
    is_global: ClassVar[bool]
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, merge: bool = False, seed: int = 0, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            accepted = ", ".join(sorted(self.default_options)) or "none"
            raise ValueError(
                f"method {self.name!r} got unknown option(s) {unknown}; accepted: {accepted}"
            )
        self.merge = merge
        self.seed = seed
        self.options = {**self.default_options, **options}

    def plan(self, stats: Mapping[int, LayerStats], limits: Mapping[int, LayerLimits], budget: Budget) -> PruningPlan:
        """Choose the experts to remove in every layer for the given budget."""
        _check_inputs(stats, limits)
        selection = self._select(stats, limits, budget)
        keep = {
            layer: sorted(set(range(limits[layer].num_experts)) - set(selection.removed[layer]))
            for layer in sorted(stats)
        }
        if not self.merge:
            merge_into: dict[int, dict[int, int]] = {layer: {} for layer in keep}
        elif selection.merge_into is not None:
            merge_into = selection.merge_into
        else:
            merge_into = {
                layer: nearest_by_cosine(stats[layer].gram, keep[layer], limits[layer])
                for layer in keep
            }
        info = {
            "method": self.name,
            "merge": self.merge,
            "seed": self.seed,
            "options": dict(self.options),
            "removed_per_layer": {layer: len(selection.removed[layer]) for layer in keep},
            **selection.info,
        }
        return PruningPlan(keep=keep, merge_into=merge_into, scores=selection.scores, info=info)

    @abstractmethod
    def _select(self, stats: Mapping[int, LayerStats], limits: Mapping[int, LayerLimits], budget: Budget) -> Selection:
        """Decide the removed experts (original indices) of every layer."""


def _check_inputs(stats: Mapping[int, LayerStats], limits: Mapping[int, LayerLimits]) -> None:
    if set(stats) != set(limits):
        raise ValueError(
            f"statistics cover layers {sorted(stats)} but limits cover {sorted(limits)}"
        )
    for layer, layer_stats in stats.items():
        if layer_stats.num_experts != limits[layer].num_experts:
            raise ValueError(
                f"layer {layer}: statistics have {layer_stats.num_experts} experts, limits say "
                f"{limits[layer].num_experts}"
            )


def lowest_per_group(scores: torch.Tensor, limits: LayerLimits, count: int) -> list[int]:
    """The ``count`` lowest-scoring experts, the same number from every group.

    Ties go to the lower index (a stable sort), so equal scores give a reproducible plan.
    """
    per_group = count // limits.n_group
    removed: list[int] = []
    for members in limits.groups():
        order = torch.sort(scores[members], stable=True).indices[:per_group]
        removed.extend(members[i] for i in order.tolist())
    return sorted(removed)


def nearest_by_cosine(gram: torch.Tensor, keep: list[int], limits: LayerLimits) -> dict[int, int]:
    """Each removed expert -> the kept expert whose outputs are most similar (cosine, from gram).

    ``gram[i, j]`` sums <o_i, o_j> over the same sampled tokens, so gram / sqrt(diag diag^T) is
    the cosine of the experts' output vectors: the expert that best stands in for a removed one.
    In group-limited layers the target is taken from the removed expert's own group, which keeps
    the groups' memberships unchanged by merging. Ties (and zero-output experts) go to the
    lowest kept index.
    """
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms.unsqueeze(0) * norms.unsqueeze(1)
    cosine = torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1.0), 0.0)
    kept = set(keep)
    targets: dict[int, int] = {}
    for members in limits.groups():
        kept_here = [e for e in members if e in kept]
        for removed in (e for e in members if e not in kept):
            best = int(torch.argmax(cosine[removed, kept_here]))
            targets[removed] = kept_here[best]
    return targets


class ScoreMethod(ExpertPruningMethod):
    """Uniform methods that score each expert and drop the lowest round(R * E) per layer."""

    is_global: ClassVar[bool] = False

    @abstractmethod
    def score(self, stats: LayerStats) -> torch.Tensor:
        """(E,) importance of each expert: the lowest are removed."""

    def _select(self, stats: Mapping[int, LayerStats], limits: Mapping[int, LayerLimits], budget: Budget) -> Selection:
        removals = budget.per_layer(limits)
        removed: dict[int, list[int]] = {}
        scores: dict[int, list[float]] = {}
        for layer in sorted(stats):
            layer_scores = self.score(stats[layer]).double()
            removed[layer] = lowest_per_group(layer_scores, limits[layer], removals[layer])
            scores[layer] = layer_scores.tolist()
        return Selection(removed=removed, scores=scores)
