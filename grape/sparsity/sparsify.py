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

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from grape.calibration.runner import run_layerwise
from grape.checkpoint import estimated_bytes, write_checkpoint
from grape.model_io import LazyCausalLM
from grape.output_guard import OutputClaim, claim_output
from grape.report import write_json_atomic
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

__all__ = ["SparsityPlan", "SparsifyJob", "sparsify_experts", "prepare_sparsify", "sparsify_model", "sparsify_cli"]


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
                raise ValueError(
                    f"pattern {pattern} prunes exactly {implied:g} of the weights; "
                    f"--sparsity {sparsity:g} contradicts it (pass {implied:g})"
                )
            sparsity = implied
        if sparsity is None:
            raise ValueError("unstructured sparsification needs --sparsity in [0, 1)")
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
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


def sparsify_experts(experts: nn.Module, batches: list[RoutedBatch] | None, plan: SparsityPlan) -> dict:
    """Prune every routed expert of one layer in place; returns the layer's report entry.

    Args:
        experts: the layer's fused experts module (any supported layout).
        batches: captured routed inputs of the calibration data (None for magnitude).
        plan: method, pattern and sparsity.
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
            for expert in range(num_experts):
                _prune_matrix(experts, name, expert, stats, plan)
    report = {}
    for name in EXPERT_WEIGHTS:
        weight = getattr(experts, name).detach()
        zeros = int((weight == 0).sum())
        report[name] = {"zeros": zeros, "numel": weight.numel(), "sparsity": zeros / weight.numel()}
    if plan.method.needs_calibration:
        report["tokens_per_expert"] = tokens.tolist()
        report["experts_without_tokens"] = [e for e in range(num_experts) if int(tokens[e]) == 0]
    return report


@dataclass
class SparsifyJob:
    """A validated sparsification run: the model opened lazily, the plan, the output location.

    Built by :func:`prepare_sparsify`, which does every cheap check; :meth:`run` does the work.
    """

    lazy: LazyCausalLM
    plan: SparsityPlan
    claim: OutputClaim
    moe_layers: list[int]
    batch_size: int = 8
    started: float = field(default_factory=time.perf_counter)

    def run(self, calib_ids: torch.Tensor | None, calibration: dict | None = None) -> dict:
        """Calibrate (unless magnitude), prune every MoE layer, write the checkpoint; the report.

        Args:
            calib_ids: (N, L) calibration token ids; required unless the method is magnitude.
            calibration: what the ids came from (source, seed...), recorded in the report.
        """
        with self.claim:
            report = self._run(calib_ids, calibration)
            self.claim.commit()
            return report

    @property
    def out(self) -> Path:
        return self.claim.out

    def _run(self, calib_ids: torch.Tensor | None, calibration: dict | None) -> dict:
        method = self.plan.method
        if method.needs_calibration:
            if calib_ids is None or calib_ids.dim() != 2 or calib_ids.numel() == 0:
                raise ValueError(f"method {method.name!r} needs calibration data (--calib): a non-empty (samples, seq_len) id tensor")
        lazy, adapter = self.lazy, self.lazy.adapter
        masks: dict[int, dict[str, torch.Tensor]] = {}
        layers: dict[int, dict] = {}

        def visit(index: int, layer: nn.Module, _hidden: list[torch.Tensor], forward) -> None:
            experts = adapter.moe_block(layer).experts
            with capture_routed_inputs(experts, layer=index) as batches:
                forward()
            layers[index] = sparsify_experts(experts, batches, self.plan)
            masks[index] = {name: getattr(experts, name).detach() != 0 for name in EXPERT_WEIGHTS}

        t_calib = time.perf_counter()
        if method.needs_calibration:
            run_layerwise(
                lazy,
                calib_ids,
                visit,
                batch_size=self.batch_size,
                sequential=True,
                layers=self.moe_layers,
                stop_after=self.moe_layers[-1],
                desc=f"sparsify ({method.name})",
            )

        def transform(index: int, layer: nn.Module) -> None:
            if index not in self.moe_layers:
                return
            experts = adapter.moe_block(layer).experts
            if index in masks:
                with torch.no_grad():
                    for name, keep in masks.pop(index).items():
                        getattr(experts, name).data.masked_fill_(~keep, 0)
            else:
                layers[index] = sparsify_experts(experts, None, self.plan)

        t_write = time.perf_counter()
        previous = _previous_report(lazy.model_dir)
        report = {
            "grape_version": __import__("grape").__version__,
            "step": "sparsify",
            "source_model": str(lazy.model_dir),
            "architecture": adapter.name,
            "method": method.name,
            "pattern": str(self.plan.pattern),
            "sparsity": self.plan.sparsity,
            "pruned": "routed expert gate_up_proj and down_proj (down_proj scored through the pruned gate_up_proj)",
            "calibration": None
            if not method.needs_calibration
            else {**(calibration or {}), "samples": int(calib_ids.shape[0]), "seq_len": int(calib_ids.shape[1]), "tokens": int(calib_ids.numel())},
        }
        if previous is not None:
            report["previous_steps"] = previous.pop("previous_steps", []) + [previous]
            if "kept_experts" in previous:
                report["kept_experts"] = previous["kept_experts"]
        write_checkpoint(
            lazy,
            self.claim,
            transform_layer=transform,
            report=report,
            plot_title=f"{method.name} {self.plan.pattern} sparsity {self.plan.sparsity:g}",
        )
        return self._finish(layers, t_calib, t_write)

    def _finish(self, layers: dict[int, dict], t_calib: float, t_write: float) -> dict:
        """Add per-layer results, totals and timings to the written report (atomically)."""
        path = self.claim.tmp / "grape_report.json"
        report = json.loads(path.read_text())
        total = sum(entry[name]["numel"] for entry in layers.values() for name in EXPERT_WEIGHTS)
        zeros = sum(entry[name]["zeros"] for entry in layers.values() for name in EXPERT_WEIGHTS)
        now = time.perf_counter()
        report["layers"] = {str(i): layers[i] for i in sorted(layers)}
        report["expert_weights"] = {"total": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0}
        report["timings_s"] = {
            "setup": round(t_calib - self.started, 3),
            "calibration_and_scoring": round(t_write - t_calib, 3),
            "save": round(now - t_write, 3),
            "total": round(now - self.started, 3),
        }
        write_json_atomic(report, path)
        return report


def _previous_report(model_dir: Path) -> dict | None:
    """The input's own grape report (e.g. of ``grape prune``), so the output records both steps."""
    path = model_dir / "grape_report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def prepare_sparsify(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    method: str,
    sparsity: float | None,
    pattern: str | SparsityPattern = "unstructured",
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> SparsifyJob:
    """Every check that needs no forward pass: options, model, MoE layers, N:M widths, output.

    Raises:
        ValueError (and subclasses): bad method/sparsity/pattern, a model that is not a supported
            MoE or has no MoE layer, M not dividing an expert's input width, an existing output.
    """
    pattern = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    plan = SparsityPlan.build(method, sparsity, pattern)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    lazy = LazyCausalLM.open(model_path, dtype=dtype, device=device)
    adapter = lazy.adapter
    moe_layers = []
    for index, layer in enumerate(adapter.decoder_layers(lazy.model)):
        block = adapter.moe_block(layer)
        if block is not None:
            plan.check_widths(block.experts, f"layer {index}")
            moe_layers.append(index)
    if not moe_layers:
        raise UnsupportedModelError(f"{lazy.model_dir} has no layer with routed experts: nothing to sparsify")
    claim = claim_output(
        out_dir, inputs={"input model": lazy.model_dir}, overwrite=overwrite, needed_bytes=estimated_bytes(lazy)
    )
    return SparsifyJob(lazy, plan, claim, moe_layers, batch_size=batch_size)


def sparsify_model(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    method: str,
    sparsity: float | None,
    pattern: str | SparsityPattern = "unstructured",
    calib_ids: torch.Tensor | None = None,
    calibration: dict | None = None,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Sparsify the routed experts of ``model_path`` into ``out_dir``; returns the report.

    See the module docstring for the algorithm; ``calibration`` describes where ``calib_ids``
    came from, for the report.
    """
    job = prepare_sparsify(
        model_path, out_dir, method=method, sparsity=sparsity, pattern=pattern,
        batch_size=batch_size, dtype=dtype, device=device, overwrite=overwrite,
    )
    return job.run(calib_ids, calibration)


def sparsify_cli(args: argparse.Namespace) -> None:
    """``grape sparsify``: validate, read the calibration text, run, print a summary."""
    from grape.data import build_calibration_ids, load_texts
    from grape.model_io import check_positions, load_tokenizer, parse_dtype

    job = prepare_sparsify(
        args.model, args.out, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
        dtype=parse_dtype(args.dtype), device=args.device, overwrite=args.overwrite,
    )
    ids = calibration = None
    with job.claim:
        if job.plan.method.needs_calibration:
            if not args.calib:
                raise ValueError(f"--method {args.method} needs calibration text: pass --calib")
            check_positions(job.lazy.config, args.seq_len)
            tokenizer = load_tokenizer(job.lazy.model_dir)
            ids = build_calibration_ids(
                tokenizer, load_texts(args.calib), num_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed
            )
            calibration = {"source": str(args.calib), "seed": args.seed}
        report = job.run(ids, calibration)
    totals = report["expert_weights"]
    print(f"wrote {job.out}")
    print(
        f"{report['method']} {report['pattern']}: {totals['zeros']:,} of {totals['total']:,} routed expert "
        f"weights are zero ({totals['sparsity']:.2%}); time {report['timings_s']['total']:.1f}s"
    )
