"""``grape prune``: the expert-pruning pipeline, from a model directory to a ragged checkpoint.

load lazily -> validate everything cheap (model, budget, data, output) -> calibrate layer by
layer (cached) -> per-expert statistics -> method plan (uniform or global budget) -> surgery
while streaming the checkpoint to disk -> report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from grape.budget import Budget, LayerLimits
from grape.calibration.cache import default_cache_dir
from grape.calibration.collect import collect_layer_stats, measure_layer
from grape.calibration.runner import run_layerwise
from grape.checkpoint import estimated_bytes, expert_counts, write_checkpoint
from grape.data import build_calibration_ids, load_texts
from grape.methods import get_method
from grape.methods.base import PruningPlan
from grape.model_io import LazyCausalLM, check_positions, load_tokenizer, parse_dtype
from grape.output_guard import claim_output
from grape.stats import LayerStats
from grape.surgery import prune_block

__all__ = ["PruneOptions", "prune", "layer_limits"]


@dataclass
class PruneOptions:
    """Everything ``grape prune`` takes besides the model (mirrors the CLI flags)."""

    method: str
    out: str
    calib: str
    budget: Budget
    merge: bool = False
    calib_samples: int = 64
    seq_len: int = 512
    sequential: bool = False
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None
    overwrite: bool = False
    sample_tokens: int = 512
    batch_size: int = 8
    use_cache: bool = True
    method_options: dict = field(default_factory=dict)


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


def prune(model: str, opts: PruneOptions) -> Path:
    """Run the whole pipeline; returns the output directory."""
    started = time.perf_counter()
    method = get_method(opts.method)(merge=opts.merge, seed=opts.seed, **opts.method_options)
    lazy = LazyCausalLM.open(model, dtype=parse_dtype(opts.dtype), device=opts.device)
    check_positions(lazy.config, opts.seq_len)
    limits = layer_limits(lazy)
    removed = opts.budget.removals(limits, is_global=method.is_global)
    cache_dir = default_cache_dir()
    claim = claim_output(
        opts.out,
        inputs={"input model": lazy.model_dir, "calibration data": opts.calib, "statistics cache": cache_dir},
        overwrite=opts.overwrite,
        needed_bytes=estimated_bytes(lazy, kept_expert_fraction=1 - removed / sum(lim.num_experts for lim in limits.values())),
    )
    with claim:
        tokenizer = load_tokenizer(lazy.model_dir)
        texts = load_texts(opts.calib)
        ids = build_calibration_ids(
            tokenizer, texts, num_samples=opts.calib_samples, seq_len=opts.seq_len, seed=opts.seed
        )
        t_calib = time.perf_counter()
        stats = collect_layer_stats(
            lazy, ids, sample_tokens=opts.sample_tokens, batch_size=opts.batch_size, seed=opts.seed,
            cache_dir=cache_dir, use_cache=opts.use_cache,
        )
        t_plan = time.perf_counter()
        plan = method.plan(stats, limits, opts.budget)
        if opts.sequential:
            plan = _sequential_replan(lazy, ids, method, plan, stats, limits, opts)
        t_write = time.perf_counter()
        params_before = sum(p.numel() for p in lazy.model.parameters())

        def transform(index: int, layer) -> None:
            if index in plan.keep:
                _apply_plan(lazy, layer, index, plan, stats[index], limits[index])

        report = {
            "grape_version": __import__("grape").__version__,
            "step": "expert_pruning",
            "source_model": str(lazy.model_dir),
            "architecture": lazy.adapter.name,
            "method": opts.method,
            "merge": opts.merge,
            "budget": {**opts.budget.to_json(), "removed_total": sum(limits[i].num_experts - len(k) for i, k in plan.keep.items())},
            "seed": opts.seed,
            "kept_experts": {str(i): k for i, k in plan.keep.items()},
            "merged_into": {str(i): {str(a): b for a, b in m.items()} for i, m in plan.merge_into.items() if m},
            "scores": {str(i): s for i, s in plan.scores.items()},
            "method_info": plan.info,
            "calibration": {
                "source": str(opts.calib),
                "samples": opts.calib_samples,
                "seq_len": opts.seq_len,
                "tokens": int(ids.numel()),
                "sample_tokens_per_layer": opts.sample_tokens,
                "sequential": opts.sequential,
            },
            "options": {k: v for k, v in asdict(opts).items() if k not in ("out", "budget")},
        }
        write_checkpoint(
            lazy,
            claim,
            transform_layer=transform,
            report=report | {"parameters_before": params_before},
            plot_title=f"{opts.method} ({opts.budget.describe()})",
        )
        params_after = sum(p.numel() for p in lazy.model.parameters())
        _finish_report(claim.tmp, params_after, started, t_calib, t_plan, t_write)
        return claim.commit()


def _apply_plan(lazy: LazyCausalLM, layer, index: int, plan: PruningPlan, stats: LayerStats, limits: LayerLimits) -> None:
    """Surgery on one materialised decoder layer according to ``plan``."""
    prune_block(
        lazy.adapter.moe_block(layer),
        lazy.adapter,
        plan.keep[index],
        merge_into=plan.merge_into.get(index) or None,
        freq=stats.freq,
        min_keep=limits.min_keep,
        n_group=limits.n_group,
    )


def _finish_report(out: Path, params_after: int, started: float, t_calib: float, t_plan: float, t_write: float) -> None:
    """Add what is only known at the end (sizes, timings) to the report, atomically."""
    import json

    from grape.report import write_json_atomic

    path = out / "grape_report.json"
    report = json.loads(path.read_text())
    now = time.perf_counter()
    report["parameters_after"] = params_after
    report["bytes_on_disk"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    report["timings_s"] = {
        "setup": round(t_calib - started, 3),
        "calibration": round(t_plan - t_calib, 3),
        "planning": round(t_write - t_plan, 3),
        "surgery_and_save": round(now - t_write, 3),
        "total": round(now - started, 3),
    }
    write_json_atomic(report, path)


def _sequential_replan(
    lazy: LazyCausalLM,
    ids: torch.Tensor,
    method,
    plan: PruningPlan,
    stats: dict[int, LayerStats],
    limits: dict[int, LayerLimits],
    opts: PruneOptions,
) -> PruningPlan:
    """``--sequential``: keep each layer's expert *count* from the plan, re-choose *which* experts.

    Layer l is re-scored on activations produced by layers < l already pruned, then pruned
    before its outputs feed layer l+1. A global method's per-layer counts come from the first
    (unpruned) pass, since a global allocation needs every layer's statistics up front.
    """
    keep: dict[int, list[int]] = {}
    merge_into: dict[int, dict[int, int]] = {}
    scores: dict[int, list[float]] = {}

    def visit(index: int, layer, _hidden, forward) -> None:
        layer_stats = measure_layer(lazy, index, layer, forward, sample_tokens=opts.sample_tokens, seed=opts.seed)
        stats[index] = layer_stats
        count = len(plan.keep[index])
        local = method.plan({index: layer_stats}, {index: limits[index]}, Budget(keep_experts=count))
        keep[index], scores[index] = local.keep[index], local.scores[index]
        merge_into[index] = local.merge_into.get(index, {})
        _apply_plan(lazy, layer, index, local, layer_stats, limits[index])

    try:
        run_layerwise(lazy, ids, visit, batch_size=opts.batch_size, sequential=True, layers=sorted(plan.keep), desc="sequential pruning")
    finally:
        # the skeleton was shrunk while pruning in place; rebuild it for the write pass
        _restore_skeleton(lazy)
    info = dict(plan.info)
    info["sequential"] = {"counts_from": "first pass", "rescored_layers": sorted(keep)}
    return PruningPlan(keep=keep, merge_into=merge_into, scores=scores, info=info)


def _restore_skeleton(lazy: LazyCausalLM) -> None:
    fresh = LazyCausalLM.open(lazy.model_dir, dtype=lazy.dtype, device=str(lazy.device))
    lazy.model = fresh.model
