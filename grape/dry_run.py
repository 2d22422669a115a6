"""The dry run: what a prune or sparsify run will need, from ``config.json`` and safetensors headers.

``grape prune ... --dry-run`` and ``grape sparsify ... --dry-run`` open the model as a skeleton
(:meth:`grape.model_io.LazyCausalLM.open_for_plan`: no tensor data is read, no tokenizer, no
calibration text), turn it into per-layer shapes and put them through the memory model
(:mod:`grape.memory_model`). Where the weight files are there, their headers give the bytes on
disk exactly; a folder holding only ``config.json`` is planned from the declared dtype and
quantization (FP8: one byte per weight plus a float32 scale per block; MXFP4: half a byte per
expert weight plus a scale byte per 32), so a user can plan before a 700 GB download.

A real run makes the same estimate after its options are validated and refuses, before any
heavy work, when the predicted peak exceeds its memory budget (:func:`check_fits`), naming the
option that would make it fit. The prediction is checked against measured peaks in
``benchmarks/memory_depth.py``. It models ``--device cpu`` (on an accelerator, weights and
activations live in device memory instead).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grape.calibration import memory_plan
from grape.errors import InputError
from grape.memory import available_memory_bytes, memory_budget, resident_bytes
from grape.memory_model import (
    LayerShape,
    Workload,
    calibration_bytes,
    calibration_flops,
    grouped_layer_memory,
    kept_statistics_bytes,
    write_bytes,
)
from grape.model_io import LazyCausalLM
from grape.quant.formats import FP8, MXFP4, QuantFormat, scale_grid
from grape.quant.mtp import mtp_layer_indices

__all__ = ["check_fits", "estimate", "format_plan", "layer_shapes", "model_workload", "resident_bytes", "tokenized_text_bytes"]


TOKENIZED_TEXT_BYTES_PER_BYTE = 85
"""Resident memory a run keeps after tokenizing its calibration text, per byte of text (measured:
35 MB for a 422 kB file with a fast BPE tokenizer). The dry run does not read the text; a real run
checks its budget after tokenizing, with this already in its resident memory."""


def tokenized_text_bytes(calib: str | None) -> int:
    """What tokenizing ``calib`` (a file or a folder of ``.txt``) will leave resident; 0 for a Hub dataset."""
    if calib is None:
        return 0
    path = Path(calib)
    files = [path] if path.is_file() else sorted(path.rglob("*.txt")) if path.is_dir() else []
    return TOKENIZED_TEXT_BYTES_PER_BYTE * sum(f.stat().st_size for f in files)


def _planned_stored_bytes(name: str, shape: tuple[int, ...], fmt: QuantFormat, itemsize: int, unquantized: set[str]) -> int:
    """Bytes a tensor will take on disk, from the config alone (no header to read)."""
    numel = math.prod(shape)
    if len(shape) < 2 or name in unquantized or "embed_tokens" in name or name.startswith("lm_head"):
        return numel * itemsize
    if fmt.method == FP8:
        rows, cols = shape[-2:]
        grid = scale_grid((rows, cols), fmt.block_size)
        return numel + math.prod(shape[:-2]) * grid[0] * grid[1] * 4
    if fmt.method == MXFP4 and ".experts." in name:
        return numel // 2 + numel // 32
    return numel * itemsize


def layer_shapes(lazy: LazyCausalLM) -> list[LayerShape]:
    """Every decoder layer of ``lazy`` as :class:`~grape.memory_model.LayerShape` (headers if any, else the config)."""
    adapter, config, index = lazy.adapter, lazy.config, lazy.index
    fmt, working, stored_item = lazy.format, lazy.dtype.itemsize, lazy.checkpoint_dtype.itemsize
    top_k = adapter.top_k(config)
    shapes = []
    for i, layer in enumerate(adapter.decoder_layers(lazy.model)):
        prefix = f"{lazy.layer_prefix(i)}."
        block = adapter.moe_block(layer)
        experts = None if block is None else int(block.experts.num_experts)
        routed_prefix = None if block is None else f"{prefix}{lazy.experts_name(i)}."
        router = None if block is None else f"{prefix}{adapter.block_attr}.{adapter.router_attr}."
        params = [(f"{prefix}{n}", tuple(p.shape)) for n, p in layer.named_parameters()]
        unquantized = {n for n, _ in params if router and n.startswith(router)}
        routed_sizes = [math.prod(s) for n, s in params if routed_prefix and n.startswith(routed_prefix)]
        routed_numel = sum(routed_sizes)
        numel = sum(math.prod(s) for _, s in params)
        if index is not None:
            entries = [e for e in index.entries.values() if e.layer == i]
            stored = sum(e.nbytes for e in entries)
            routed_stored = sum(e.nbytes for e in entries if e.routed)
            largest = max((e.nbytes for e in entries), default=0)
            fused = any(e.routed and e.expert is None for e in entries)
        else:
            sizes = {n: _planned_stored_bytes(n, s, fmt, stored_item, unquantized) for n, s in params}
            stored = sum(sizes.values())
            routed_stored = sum(b for n, b in sizes.items() if routed_prefix and n.startswith(routed_prefix))
            # releases store one tensor per expert (GPT-OSS's MXFP4 experts are fused per layer)
            fused = fmt.method == MXFP4
            largest = max((b if fused or not (routed_prefix and n.startswith(routed_prefix)) else b // experts for n, b in sizes.items()), default=0)
        intermediate = 0
        if block is not None:
            intermediate = int(block.experts.down_proj.shape[-1] if block.experts.down_proj.dim() == 3 else 0)
        shapes.append(
            LayerShape(
                index=i, working_bytes=numel * working, stored_bytes=stored, experts=experts,
                expert_working_bytes=routed_numel * working // experts if experts else 0,
                expert_stored_bytes=routed_stored // experts if experts else 0,
                largest_stored_bytes=largest, dense_params=numel - routed_numel,
                expert_params=routed_numel // experts if experts else 0,
                expert_largest_params=max(routed_sizes) // experts if experts else 0, top_k=top_k if experts else 0,
                intermediate=intermediate, fused_experts=fused,
            )
        )  # fmt: skip
    return shapes


def _outside_layers(lazy: LazyCausalLM) -> tuple[int, int, int]:
    """(stored bytes outside the decoder layers, the largest of those tensors, MTP layers' bytes)."""
    mtp = set(mtp_layer_indices(lazy.config))
    if lazy.index is not None:
        entries = list(lazy.index.entries.values())
        outside = [e.nbytes for e in entries if e.layer is None]
        mtp_bytes = sum(e.nbytes for e in entries if e.layer in mtp)
        return sum(outside), max(outside, default=0), mtp_bytes
    item = lazy.checkpoint_dtype.itemsize
    sizes = [p.numel() * item for n, p in lazy.model.named_parameters() if not n.startswith("model.layers.")]
    mtp_bytes = 0
    if mtp:  # DeepSeek's MTP layer: one more MoE layer, its own embedding and head, and a 2H x H projection
        last = layer_shapes(lazy)[-1]
        hidden, vocab = int(lazy.config.hidden_size), int(lazy.config.vocab_size)
        mtp_bytes = len(mtp) * (last.stored_bytes + 2 * vocab * hidden * item + 2 * hidden * hidden)
    return sum(sizes), max(sizes, default=0), mtp_bytes


def model_workload(lazy: LazyCausalLM, command: str, **fields: Any) -> Workload:
    """A :class:`~grape.memory_model.Workload` with the model's widths filled in."""
    config = lazy.config
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or getattr(config, "v_head_dim", None) or config.hidden_size // heads)
    return Workload(command=command, hidden=int(config.hidden_size), heads=heads, head_dim=head_dim, itemsize=lazy.dtype.itemsize, **fields)


def estimate(
    lazy: LazyCausalLM, work: Workload, *, budget: int | None = None, baseline: int | None = None, calib: str | None = None
) -> dict[str, Any]:
    """The dry run's numbers for running ``work`` on ``lazy``: JSON-able, bytes and FLOPs.

    ``budget`` (bytes) sizes the expert groups where calibration groups experts
    (:data:`~grape.memory_model.CALIBRATION_GROUPS_EXPERTS`); ``baseline`` is the interpreter's
    memory (default: this process's now), plus what tokenizing ``calib`` will leave when the
    text is still to be read (a dry run).
    """
    baseline = (resident_bytes() if baseline is None else baseline) + tokenized_text_bytes(calib)
    shapes = layer_shapes(lazy)
    outside, largest_outside, mtp_bytes = _outside_layers(lazy)
    moe = [s for s in shapes if s.is_moe]
    last = work.last_calibrated_layer if work.last_calibrated_layer is not None else max((s.index for s in moe), default=-1)
    calibrated = {s.index for s in shapes if s.index <= last} if work.samples else set()
    activations = work.tokens * work.hidden * work.itemsize
    embedding = max((p.numel() for n, p in lazy.model.named_parameters() if "embed_tokens" in n), default=0) * work.itemsize
    phases = {"write": 0, "calibration": embedding + 2 * activations if work.samples else 0}
    kept, layers = 0, []
    for shape in shapes:
        group = shape.experts
        if shape.is_moe and work.command == "prune" and budget is not None:
            group = _calibration_group(shape, work, budget, baseline + kept)
        entry: dict[str, Any] = {"layer": shape.index, "experts": shape.experts, "stored_bytes": shape.stored_bytes}
        if shape.is_moe:
            kept_experts = max(1, round(shape.experts * work.kept_fraction))
            entry.update(experts_kept=kept_experts, expert_stored_bytes=shape.expert_stored_bytes, calibration_group=group)
        entry["output_bytes"] = _output_bytes(shape, work)
        if shape.index in calibrated:
            entry["calibration_bytes"] = calibration_bytes(shape, work, group=group)
            entry["calibration_flops"] = calibration_flops(shape, work)
            phases["calibration"] = max(phases["calibration"], entry["calibration_bytes"] + kept)
            kept += kept_statistics_bytes(shape, work)
        layers.append(entry)
    for shape in shapes:
        phases["write"] = max(phases["write"], write_bytes(shape, work) + kept)
    phases["write"] = max(phases["write"], 2 * largest_outside + kept)
    return {
        "command": work.command,
        "peak_rss_bytes": baseline + max(phases.values()),
        "baseline_bytes": baseline,
        "phases_bytes": phases,
        "kept_statistics_bytes": kept,
        "output_bytes": sum(e["output_bytes"] for e in layers) + outside + mtp_bytes,
        "source_bytes": sum(s.stored_bytes for s in shapes) + outside + mtp_bytes,
        "mtp_bytes": mtp_bytes,
        "calibration_flops": sum(e.get("calibration_flops", 0) for e in layers),
        "calibration_tokens": work.tokens,
        "weights_from": "safetensors headers" if lazy.index is not None else "config.json only",
        "format": lazy.format.method,
        "working_dtype": str(lazy.dtype).removeprefix("torch."),
        "layers": layers,
    }


def _calibration_group(shape: LayerShape, work: Workload, budget: int, baseline: int) -> int:
    """The group of experts calibration will materialise at once under ``budget`` (the same
    function, :func:`grape.calibration.memory_plan.experts_per_group`); 1 where not even one fits,
    so the prediction shows by how much the run exceeds the budget."""
    try:
        return memory_plan.experts_per_group(grouped_layer_memory(shape, work), budget, baseline)
    except InputError:
        return 1


def _output_bytes(shape: LayerShape, work: Workload) -> int:
    if not shape.is_moe:
        return shape.stored_bytes
    removed = shape.experts - max(1, round(shape.experts * work.kept_fraction))
    return shape.stored_bytes - removed * shape.expert_stored_bytes


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB" if value >= 1e9 else f"{value / 1e6:.0f} MB"


def check_fits(lazy: LazyCausalLM, work: Workload, max_memory: int | None) -> dict[str, Any]:
    """The run's estimate, or an InputError (one line) when its peak exceeds the memory budget.

    The message names the calibration settings that would fit (fewer ``--calib-samples``, a
    shorter ``--seq-len``, fewer ``--sample-tokens``: the largest value that fits of each) and
    the ``--max-memory`` that would.
    """
    budget = memory_budget(max_memory)
    plan = estimate(lazy, work, budget=budget)
    peak = plan["peak_rss_bytes"]
    if peak <= budget:
        return plan
    fixes = []
    for flag, field in (("--calib-samples", "samples"), ("--seq-len", "seq_len"), ("--sample-tokens", "sample_tokens")):
        current = getattr(work, field)
        if current <= 1 or (field == "sample_tokens" and work.command != "prune"):
            continue
        fitting = _largest_fitting(lambda v, f=field: estimate(lazy, dataclasses.replace(work, **{f: v}), budget=budget, baseline=plan["baseline_bytes"])["peak_rss_bytes"] <= budget, current)
        if fitting:
            fixes.append(f"{flag} {fitting}")
    needed = math.ceil(peak / 1e8) / 10
    available = available_memory_bytes()
    machine = "" if needed * 1e9 <= available else f" (this machine has {_gb(available)} available)"
    fixes.append(f"--max-memory {needed:g}GB{machine}")
    given = f"--max-memory {_gb(budget)}" if max_memory is not None else f"the default budget, 90% of the available memory, {_gb(budget)}"
    raise InputError(
        f"the run would need about {_gb(peak)} of memory (grape {work.command} --dry-run shows where), more than "
        f"{given}; it would fit with {' or '.join(fixes)}"
    )


def _largest_fitting(fits: Callable[[int], bool], current: int) -> int | None:
    """The largest value below ``current`` for which ``fits`` holds (monotone), or None."""
    if not fits(1):
        return None
    low, high = 1, current - 1
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def format_plan(plan: dict[str, Any], *, budget: int) -> str:
    """The dry run as text: one line per layer, then the totals."""
    lines = [f"{'layer':>5}  {'experts':>9}  {'on disk':>10}  {'output':>10}  {'calibration peak':>16}  {'GFLOP':>10}"]
    for entry in plan["layers"]:
        experts = "dense" if entry["experts"] is None else f"{entry['experts_kept']}/{entry['experts']}"
        calib = entry.get("calibration_bytes")
        lines.append(
            f"{entry['layer']:>5}  {experts:>9}  {_gb(entry['stored_bytes']):>10}  {_gb(entry['output_bytes']):>10}  "
            f"{_gb(calib) if calib is not None else '-':>16}  {entry.get('calibration_flops', 0) / 1e9:>10.1f}"
        )
    if plan["mtp_bytes"]:
        lines.append(f"  MTP  {'copied':>9}  {_gb(plan['mtp_bytes']):>10}  {_gb(plan['mtp_bytes']):>10}")
    verdict = "fits" if plan["peak_rss_bytes"] <= budget else "does NOT fit"
    lines += [
        f"weights: {plan['weights_from']} ({plan['format']}); working dtype {plan['working_dtype']}; "
        f"calibration tokens {plan['calibration_tokens']:,}",
        f"source {_gb(plan['source_bytes'])} -> output {_gb(plan['output_bytes'])}",
        f"calibration: {plan['calibration_flops'] / 1e12:.2f} TFLOP",
        f"predicted peak RSS {_gb(plan['peak_rss_bytes'])} (interpreter {_gb(plan['baseline_bytes'])}); "
        f"memory budget {_gb(budget)}: {verdict}",
    ]
    return "\n".join(lines)

