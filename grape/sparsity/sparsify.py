"""MoE-Pruner / Wanda / magnitude sparsification of routed experts, one layer at a time.

Per MoE layer (layers in order, calibration activations flowing through already pruned layers):

1. capture, for every calibration batch, the tokens entering the routed experts with the ids
   and routing weights the layer chose (:func:`grape.sparsity.collect.capture_routed_inputs`);
2. score and prune every expert's ``gate_up_proj`` from statistics of the hidden states routed
   to it;
3. only then collect ``down_proj``'s input statistics, the intermediate act(gate) * up
   computed through the *already pruned* gate_up_proj, and prune ``down_proj``.

Step 3's order is a deliberate choice: down_proj will, after pruning, only ever see the
activations of the pruned gate_up_proj, so its scores should weigh input channels by what they
will carry, not by what the dense expert produced. This is the same argument that makes the
layers sequential (SparseGPT/Wanda's "sequential" variant), applied inside the expert.

Only routed expert matrices are pruned; routers, attention, norms, expert biases and shared
experts stay dense. An expert that received no calibration token has no activation statistics;
it is pruned by magnitude (its scores would otherwise all be zero and the mask arbitrary) and
the report lists it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from grape.calibration.runner import run_layerwise
from grape.dry_run import model_workload
from grape.errors import InputError
from grape.layer_writer import ExpertEdit
from grape.memory_model import Workload
from grape.pipeline import CommonOptions, Pipeline, run_pipeline, stage_labels
from grape.report import previous_report
from grape.sparsity.collect import (
    InputStats,
    RoutedBatch,
    capture_routed_inputs,
    input_stats,
)
from grape.sparsity.layout import EXPERT_WEIGHTS, in_features, oriented
from grape.sparsity.masks import SparsityPattern, keep_mask, parse_pattern
from grape.sparsity.scores import WeightCriterion, get_criterion
from grape_kernels.architectures import UnsupportedModelError
from grape_kernels.experts_module import expert_activation

__all__ = ["SparsityPlan", "SparsifyOptions", "SparsifyPipeline", "apply_sparsity", "sparsify", "sparsify_experts"]


@dataclass(frozen=True)
class SparsityPlan:
    """What to prune and how: the validated ``--method``, ``--pattern`` and ``--sparsity``."""

    method: WeightCriterion
    pattern: SparsityPattern
    sparsity: float

    @classmethod
    def build(cls, method: str, sparsity: float | None, pattern: SparsityPattern) -> SparsityPlan:
        """Validate the combination; N:M fixes the sparsity, so a conflicting value is an error."""
        score_method = get_criterion(method)
        if pattern.structured:
            implied = pattern.sparsity
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise InputError(
                    f"pattern {pattern} prunes exactly {implied:g} of the weights; "
                    f"--sparsity {sparsity:g} contradicts it (pass {implied:g})"
                )
            sparsity = implied
        if sparsity is None:
            raise InputError("unstructured sparsification needs --sparsity in [0, 1)")
        if not 0.0 <= float(sparsity) < 1.0:
            raise InputError(f"sparsity must be in [0, 1), got {sparsity}")
        return cls(score_method, pattern, float(sparsity))

    def check_widths(self, experts: nn.Module, what: str) -> None:
        """Raise unless N:M groups tile the input width of both expert matrices (shape-only)."""
        for name in EXPERT_WEIGHTS:
            self.pattern.check_width(in_features(experts, name), f"{what} {name}")


def _prune_matrix(
    experts: nn.Module, name: str, expert: int, stats: InputStats | None, plan: SparsityPlan
) -> None:
    """Zero the lowest-scoring weights of one expert matrix in place."""
    weight = oriented(experts, name, expert)
    if stats is None or int(stats.tokens[expert]) == 0:
        scores = get_criterion("magnitude").score(weight, None, expert)
    else:
        scores = plan.method.score(weight, stats, expert)
    weight.masked_fill_(~keep_mask(scores, plan.pattern, plan.sparsity), 0)


def sparsify_experts(
    experts: nn.Module, batches: list[RoutedBatch] | None, plan: SparsityPlan, *, statistics: dict | None = None
) -> dict:
    """Prune every routed expert of one layer in place; returns the layer's report entry.

    Args:
        experts: the layer's fused experts module (any supported layout).
        batches: captured routed inputs of the calibration data (None for magnitude).
        plan: method, pattern and sparsity.
        statistics: if given, receives each matrix's input statistics, from which
            :func:`apply_sparsity` prunes a fresh copy of the layer's weights identically.
    """
    num_experts = int(experts.gate_up_proj.shape[0])
    if plan.method.needs_calibration and batches is None:
        raise ValueError(f"method {plan.method.name!r} needs calibration batches")
    tokens = torch.zeros(num_experts, dtype=torch.int64)
    with torch.no_grad():
        for name in EXPERT_WEIGHTS:
            stats = None
            if plan.method.needs_calibration:
                width = in_features(experts, name)
                features = None if name == "gate_up_proj" else lambda e, x: expert_activation(experts, e, x, dtype=torch.float32)
                stats = input_stats(batches, num_experts, width, features)
                tokens = stats.tokens
            if statistics is not None:
                statistics[name] = stats
            for expert in range(num_experts):
                _prune_matrix(experts, name, expert, stats, plan)
    report = {}
    for name in EXPERT_WEIGHTS:
        weight = getattr(experts, name).detach()
        # count_nonzero reduces in place; (weight == 0).sum() widened a whole layer's mask to
        # int64 first (8 bytes a weight: +217 MiB, sparsify's peak at hidden 1024, 8 experts)
        zeros = weight.numel() - int(torch.count_nonzero(weight))
        report[name] = {"zeros": zeros, "numel": weight.numel(), "sparsity": zeros / weight.numel()}
    if plan.method.needs_calibration:
        report["tokens_per_expert"] = tokens.tolist()
        report["experts_without_tokens"] = [e for e in range(num_experts) if int(tokens[e]) == 0]
    return report


def apply_sparsity(experts: nn.Module, statistics: dict[str, InputStats | None], plan: SparsityPlan) -> None:
    """Prune the layer's weights (fresh from the checkpoint) with the statistics :func:`sparsify_experts` kept.

    The masks come out identical: gate_up_proj's scores depend on its weights and statistics
    only, and down_proj's statistics were measured through the pruned gate_up_proj already.
    """
    with torch.no_grad():
        for name in EXPERT_WEIGHTS:
            for expert in range(int(experts.gate_up_proj.shape[0])):
                _prune_matrix(experts, name, expert, statistics[name], plan)


@dataclass(frozen=True, kw_only=True)
class SparsifyOptions(CommonOptions):
    """``grape sparsify``'s own options: the criterion, the sparsity and its pattern."""

    method: str = "moe_pruner"
    sparsity: float | None = None
    pattern: str = "unstructured"


class SparsifyPipeline(Pipeline):
    """Weight sparsity inside routed experts through the shared stages (see the module docs).

    Layers are pruned *while* calibrating (each layer's statistics must see the already pruned
    layers before it), so there is no separate plan stage; magnitude needs no calibration and
    prunes each layer as it is written.
    """

    step = "sparsify"
    timing_labels = stage_labels(calibrate="calibration_and_scoring", plan="calibration_and_scoring", write="save")
    options: SparsifyOptions

    def validate(self) -> None:
        self.validate_plan()
        if self.sparsity.method.needs_calibration:
            self.ids = self.load_calibration(required_by=f"method {self.options.method!r}")

    def validate_plan(self) -> None:
        o = self.options
        self.sparsity = SparsityPlan.build(o.method, o.sparsity, parse_pattern(o.pattern))
        adapter = self.lazy.adapter
        self.moe_layers = []
        for index, layer in enumerate(adapter.decoder_layers(self.lazy.model)):
            block = adapter.moe_block(layer)
            if block is not None:
                self.sparsity.check_widths(block.experts, f"layer {index}")
                self.moe_layers.append(index)
        if not self.moe_layers:
            raise UnsupportedModelError(f"{self.lazy.model_dir} has no layer with routed experts: nothing to sparsify")
        # per layer and matrix, the (E, in) input statistics the masks come from: a mask for every
        # weight of every layer would grow with depth, these are 1/rows of it and re-make the masks
        self.statistics: dict[int, dict[str, InputStats | None]] = {}
        self.layers: dict[int, dict] = {}

    def workload(self) -> Workload:
        o, calibrates = self.options, self.sparsity.method.needs_calibration
        samples, seq_len = (o.calib_samples, o.seq_len) if self.ids is None else tuple(self.ids.shape)
        return model_workload(
            self.lazy, "sparsify", samples=samples if calibrates else 0, seq_len=seq_len, batch_size=o.batch_size,
            activation_copies=3, last_calibrated_layer=self.moe_layers[-1],
        )  # fmt: skip

    def inputs(self) -> dict:
        return {"input model": self.lazy.model_dir, "calibration data": self.options.calib if self.ids is not None else None}

    def calibrate(self) -> None:
        if self.ids is None:
            return
        adapter = self.lazy.adapter

        def visit(index: int, layer: nn.Module, _hidden: list[torch.Tensor], forward) -> None:
            experts = adapter.moe_block(layer).experts
            with capture_routed_inputs(experts, layer=index) as batches:
                forward()
            self.statistics[index] = {}
            self.layers[index] = sparsify_experts(experts, batches, self.sparsity, statistics=self.statistics[index])

        run_layerwise(
            self.lazy,
            self.ids,
            visit,
            batch_size=self.options.batch_size,
            sequential=True,
            layers=self.moe_layers,
            stop_after=self.moe_layers[-1],
            desc=f"sparsify ({self.sparsity.method.name})",
        )

    def expert_edit(self, index: int) -> ExpertEdit | None:
        """Every expert is kept and only zeroed (a quantized source's codes are masked, scales kept)."""
        if index not in self.moe_layers:
            return None
        count = int(self.lazy.adapter.moe_block(self.lazy.adapter.decoder_layers(self.lazy.model)[index]).experts.num_experts)
        return ExpertEdit(kept=tuple(range(count)), zeroed=True)

    def transform_layer(self, index: int, layer: nn.Module) -> None:
        if index not in self.moe_layers:
            return
        experts = self.lazy.adapter.moe_block(layer).experts
        if index in self.statistics:
            apply_sparsity(experts, self.statistics.pop(index), self.sparsity)
        else:
            self.layers[index] = sparsify_experts(experts, None, self.sparsity)

    @property
    def plot_title(self) -> str:
        return f"{self.sparsity.method.name} {self.sparsity.pattern} sparsity {self.sparsity.sparsity:g}"

    def report_sections(self) -> dict[str, Any]:
        layers = self.layers
        total = sum(entry[name]["numel"] for entry in layers.values() for name in EXPERT_WEIGHTS)
        zeros = sum(entry[name]["zeros"] for entry in layers.values() for name in EXPERT_WEIGHTS)
        sections = {
            "method": self.sparsity.method.name,
            "pattern": str(self.sparsity.pattern),
            "sparsity": self.sparsity.sparsity,
            "pruned": "routed expert gate_up_proj and down_proj (down_proj scored through the pruned gate_up_proj)",
            "calibration": self.calibration_summary(),
            "layers": {str(i): layers[i] for i in sorted(layers)},
            "expert_weights": {"total": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0},
        }
        previous = previous_report(self.lazy.model_dir)
        if previous is not None and "kept_experts" in previous:
            sections["kept_experts"] = previous["kept_experts"]  # the experts are the same ones
        return sections


def sparsify(options: SparsifyOptions) -> dict[str, Any]:
    """Sparsify the routed experts of ``options.model`` into ``options.out``; returns the report."""
    return run_pipeline(SparsifyPipeline(options))
