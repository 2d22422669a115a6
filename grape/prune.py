"""``grape prune``: remove or merge whole experts, from a model directory to a ragged checkpoint.

The stages (:mod:`grape.pipeline`): validate the method, the budget against every layer's
limits and the calibration text -> calibrate every MoE layer's statistics (cached) -> plan
with the method (uniform or global budget; ``--sequential`` re-chooses layer by layer) -> the
surgery happens while each layer is streamed to the output -> report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from grape.budget import Budget, LayerLimits
from grape.calibration.cache import default_cache_dir
from grape.calibration.collect import collect_layer_stats, measure_layer
from grape.calibration.runner import run_layerwise
from grape.checkpoint import estimated_bytes, expert_counts
from grape.dry_run import model_workload
from grape.layer_writer import ExpertEdit
from grape.memory_model import Workload
from grape.merge import MergeFit, apply_fitted, fit_merges, fresh_skeleton, merge_groups
from grape.methods import get_method
from grape.methods.base import ExpertPruningMethod, PruningPlan
from grape.model_io import LazyCausalLM
from grape.pipeline import CommonOptions, Pipeline, run_pipeline, stage_labels
from grape.stats import LayerStats
from grape.surgery import prune_block

__all__ = ["PruneOptions", "PrunePipeline", "prune", "layer_limits"]


@dataclass(frozen=True, kw_only=True)
class PruneOptions(CommonOptions):
    """``grape prune``'s own options (besides :class:`~grape.pipeline.CommonOptions`).

    Attributes:
        method: a registered pruning method (``grape.methods.available_methods()``).
        budget: how many experts to remove.
        merge: merge removed experts into their nearest kept neighbour instead of dropping.
        merge_fit: how merged experts get their weights (:mod:`grape.merge`).
        sequential: re-choose each layer's experts on the already pruned layers' outputs.
        sample_tokens: tokens per layer on which every expert is evaluated.
        method_options: the method's own options (e.g. GRAPE's ``entropy_floor``).
    """

    method: str
    budget: Budget
    merge: bool = False
    merge_fit: MergeFit = MergeFit()
    sequential: bool = False
    sample_tokens: int = 512
    method_options: dict[str, Any] = field(default_factory=dict)


def layer_limits(lazy: LazyCausalLM) -> dict[int, LayerLimits]:
    """Per MoE layer: current expert count, fewest experts it may keep, routing groups."""
    counts = expert_counts(lazy.model, lazy)
    min_keep = lazy.adapter.min_experts(lazy.config)
    groups = lazy.adapter.n_group(lazy.config)
    return {
        i: LayerLimits(num_experts=c, min_keep=min_keep, n_group=groups)
        for i, c in enumerate(counts)
        if c is not None
    }


class PrunePipeline(Pipeline):
    """Expert pruning through the shared stages (see the module docs)."""

    step = "expert_pruning"
    timing_labels = stage_labels(calibrate="calibration", plan="planning", write="surgery_and_save")
    options: PruneOptions

    def validate(self) -> None:
        self.validate_plan()
        self.ids = self.load_calibration(required_by="grape prune")

    def validate_plan(self) -> None:
        o = self.options
        self.method: ExpertPruningMethod = get_method(o.method)(merge=o.merge, seed=o.seed, **o.method_options)
        self.limits = layer_limits(self.lazy)
        self.removals = o.budget.removals(self.limits, is_global=self.method.is_global)

    def workload(self) -> Workload:
        o = self.options
        samples, seq_len = (o.calib_samples, o.seq_len) if self.ids is None else tuple(self.ids.shape)
        experts = sum(lim.num_experts for lim in self.limits.values())
        return model_workload(
            self.lazy, "prune", samples=samples, seq_len=seq_len, batch_size=o.batch_size, sample_tokens=o.sample_tokens,
            activation_copies=3 if o.sequential else 2, kept_fraction=1 - self.removals / experts,
            write_materialises_experts=o.merge,
        )  # fmt: skip

    def inputs(self) -> dict:
        return {**super().inputs(), "statistics cache": default_cache_dir()}

    def estimated_bytes(self) -> int:
        experts = sum(lim.num_experts for lim in self.limits.values())
        return estimated_bytes(self.lazy, kept_expert_fraction=1 - self.removals / experts)

    def calibrate(self) -> None:
        o = self.options
        self.stats: dict[int, LayerStats] = collect_layer_stats(
            self.lazy, self.ids, sample_tokens=o.sample_tokens, batch_size=o.batch_size, seed=o.seed,
            cache_dir=default_cache_dir(), use_cache=o.use_cache, max_memory=o.max_memory,
        )  # fmt: skip

    def plan(self) -> None:
        self.pruning: PruningPlan = self.method.plan(self.stats, self.limits, self.options.budget)
        if self.options.sequential:
            self.pruning = self._sequential_replan()
        self.fitted = self._fit_merges()

    def _fit_merges(self) -> dict:
        """The least-squares merge's own pass over the calibration windows (:mod:`grape.merge`)."""
        o, plan = self.options, self.pruning
        if not o.merge or o.merge_fit.kind != "least_squares":
            return {}
        groups = {i: merge_groups(keep, plan.merge_into.get(i) or {}) for i, keep in plan.keep.items()}
        surgery = lambda index, layer: self._apply(layer, index, plan)  # noqa: E731
        return fit_merges(self.lazy, self.ids, groups, surgery, ridge=o.merge_fit.ridge, batch_size=o.batch_size)

    def transform_layer(self, index: int, layer: nn.Module) -> None:
        if index in self.pruning.keep:
            self._apply(layer, index, self.pruning)
            if index in self.fitted:
                apply_fitted(self.lazy.adapter.moe_block(layer), self.fitted[index].rows)

    def expert_edit(self, index: int) -> ExpertEdit | None:
        """Drop keeps experts' weights as they are; merge changes each target's (written from memory)."""
        if index not in self.limits:
            return None
        keep = sorted(self.pruning.keep.get(index, range(self.limits[index].num_experts)))
        targets = set((self.pruning.merge_into.get(index) or {}).values())
        return ExpertEdit(kept=tuple(keep), changed=frozenset(keep.index(t) for t in targets))

    def _apply(self, layer: nn.Module, index: int, plan: PruningPlan) -> None:
        """Surgery on one materialised decoder layer according to ``plan`` (weights averaged
        only where the merge fit asks for it; the least-squares rows are written after)."""
        limits = self.limits[index]
        merge_into = plan.merge_into.get(index) if self.options.merge_fit.averages_weights else None
        prune_block(
            self.lazy.adapter.moe_block(layer),
            self.lazy.adapter,
            plan.keep[index],
            merge_into=merge_into or None,
            freq=self.stats[index].freq,
            min_keep=limits.min_keep,
            n_group=limits.n_group,
        )

    @property
    def plot_title(self) -> str:
        return f"{self.options.method} ({self.options.budget.describe()})"

    def report_sections(self) -> dict[str, Any]:
        o, plan = self.options, self.pruning
        removed = sum(self.limits[i].num_experts - len(k) for i, k in plan.keep.items())
        return {
            "method": o.method,
            "merge": o.merge,
            "budget": {**o.budget.to_json(), "removed_total": removed},
            "kept_experts": {str(i): k for i, k in plan.keep.items()},
            "merged_into": {str(i): {str(a): b for a, b in m.items()} for i, m in plan.merge_into.items() if m},
            "merge_fits": {str(i): {str(e): r for e, r in f.record.items()} for i, f in self.fitted.items()} or None,
            "scores": {str(i): s for i, s in plan.scores.items()},
            "method_info": plan.info,
            "calibration": {
                **self.calibration_summary(),
                "sample_tokens_per_layer": o.sample_tokens,
                "sequential": o.sequential,
            },
        }

    def _sequential_replan(self) -> PruningPlan:
        """``--sequential``: keep each layer's expert *count* from the plan, re-choose *which* experts.

        Layer l is re-scored on activations produced by layers < l already pruned, then pruned
        before its outputs feed layer l+1. A global method's per-layer counts come from the
        first (unpruned) pass, since a global allocation needs every layer's statistics up front.
        """
        o, lazy, first = self.options, self.lazy, self.pruning
        keep: dict[int, list[int]] = {}
        merge_into: dict[int, dict[int, int]] = {}
        scores: dict[int, list[float]] = {}

        def visit(index: int, layer: nn.Module, _hidden, forward) -> None:
            self.stats[index] = measure_layer(lazy, index, layer, forward, sample_tokens=o.sample_tokens, seed=o.seed)
            count = len(first.keep[index])
            local = self.method.plan({index: self.stats[index]}, {index: self.limits[index]}, Budget(keep_experts=count))
            keep[index], scores[index] = local.keep[index], local.scores[index]
            merge_into[index] = local.merge_into.get(index, {})
            self._apply(layer, index, local)

        try:
            run_layerwise(lazy, self.ids, visit, batch_size=o.batch_size, sequential=True, layers=sorted(first.keep), desc="sequential pruning")
        finally:
            lazy.model = fresh_skeleton(lazy)  # the skeleton was shrunk while pruning in place
        info = {**first.info, "sequential": {"counts_from": "first pass", "rescored_layers": sorted(keep)}}
        return PruningPlan(keep=keep, merge_into=merge_into, scores=scores, info=info)


def prune(options: PruneOptions) -> dict[str, Any]:
    """Prune ``options.model`` into ``options.out``; returns the report written with it."""
    return run_pipeline(PrunePipeline(options))

