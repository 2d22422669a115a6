"""What a checkpoint holds, read from ``config.json`` and safetensors headers alone.

``grape info`` answers "how many experts does each layer keep, and how big is the model really"
for checkpoints far larger than memory, so nothing here instantiates a model or loads weights:
shapes and dtypes come from the safetensors headers, read and checked against the config by
:func:`grape.checkpoint_files.read_layout` (which also knows both routed-expert layouts and that
shared experts are not routed experts). A checkpoint whose config and weights disagree is
reported as broken instead of being summarised wrongly. Only the optional sparsity count reads
tensor data, one tensor (and one bounded chunk of rows) at a time, so its peak memory is one
chunk whatever the checkpoint size.
"""

from __future__ import annotations

import os
from typing import Any

from grape.checkpoint_files import TENSOR_TYPES, TensorEntry, read_layout
from grape.quant.formats import MXFP4, QuantFormat, TensorInfo, logical_parameters

__all__ = ["RATIO_KEYS", "model_info", "compare_info"]

# Elements read at once by the sparsity count: bounds peak memory on huge fused tensors.
_ZERO_COUNT_CHUNK = 1 << 24


def _count_zeros(t: TensorEntry, fmt: QuantFormat) -> int:
    """Exact zero parameters (+0.0 and -0.0) of one tensor, read in chunks of rows.

    FP8 codes are compared as values; an MXFP4 byte holds two E2M1 values, each zero when its
    three magnitude bits are; block scales hold no parameters.
    """
    if logical_parameters(t.name, TensorInfo(t.dtype, t.shape), fmt) == 0:
        return 0
    packed = fmt.method == MXFP4 and t.name.endswith("_blocks")
    if not t.shape or t.numel <= _ZERO_COUNT_CHUNK:
        chunks = [t.read()]
    else:
        step = max(1, _ZERO_COUNT_CHUNK // (t.numel // t.shape[0]))
        chunks = (t.read((start, min(start + step, t.shape[0]))) for start in range(0, t.shape[0], step))
    zeros = 0
    for chunk in chunks:
        if packed:
            zeros += int(((chunk & 0x07) == 0).sum()) + int(((chunk & 0x70) == 0).sum())
            continue
        if chunk.dtype.is_floating_point and chunk.dtype.itemsize == 1:
            chunk = chunk.float()  # float8 comparisons are not implemented on every backend
        zeros += int((chunk == 0).sum())
    return zeros


def _group_by_layer(tensors: list[TensorEntry]) -> dict[int | None, list[TensorEntry]]:
    groups: dict[int | None, list[TensorEntry]] = {}
    for t in tensors:
        groups.setdefault(t.layer, []).append(t)
    return groups


def _add_sparsity(info: dict[str, Any], tensors: list[TensorEntry], fmt: QuantFormat) -> None:
    """Count exact zeros tensor by tensor, and add the fractions to ``info``."""
    zeros_of = {t.name: _count_zeros(t, fmt) for t in tensors}
    parameters_of = {t.name: logical_parameters(t.name, TensorInfo(t.dtype, t.shape), fmt) for t in tensors}

    def fractions(selected: list[TensorEntry]) -> dict[str, dict[str, Any]]:
        out = {}
        for kind in TENSOR_TYPES:
            of_kind = [t for t in selected if t.kind == kind]
            zeros, total = sum(zeros_of[t.name] for t in of_kind), sum(parameters_of[t.name] for t in of_kind)
            out[kind] = {
                "zeros": zeros,
                "parameters": total,
                "zero_fraction": zeros / total if total else 0.0,
            }
        return out

    per_layer = _group_by_layer(tensors)
    for layer in info["layers"]:
        by_type = fractions(per_layer.get(layer["layer"], []))
        total = sum(v["parameters"] for v in by_type.values())
        layer["zero_fraction"] = sum(v["zeros"] for v in by_type.values()) / total if total else 0.0
        layer["zero_fraction_by_type"] = {
            k: v["zero_fraction"] for k, v in by_type.items() if v["parameters"]
        }
    by_type = fractions(tensors)
    info["sparsity"] = {
        "zero_fraction": sum(zeros_of.values()) / info["parameters"] if info["parameters"] else 0.0,
        "by_type": by_type,
    }


def model_info(path: str | os.PathLike[str], *, sparsity: bool = False) -> dict:
    """Per-layer routed-expert counts and sizes, and model totals, of a checkpoint folder.

    Reads ``config.json`` and the safetensors headers (sharded or not). With ``sparsity=True``
    also streams every tensor once to count exact zeros, per layer and per tensor type
    (:data:`grape.checkpoint_files.TENSOR_TYPES`). :mod:`grape.info_format` turns the result
    into text.

    Returns a dict with ``path``, ``model_type``, ``architecture``, ``num_layers``, ``top_k``,
    ``files``, ``parameters`` (model parameters: an FP8 code is one, an MXFP4 byte two, block
    scales none), ``tensor_bytes``, ``file_bytes`` (size on disk, headers included),
    ``total_experts``, ``routed_expert_parameters``, ``routed_expert_bytes``, ``dtypes``
    (parameters per stored dtype), ``quantization`` (``"none"``, ``"fp8"`` or ``"mxfp4"``),
    ``mtp_parameters`` (DeepSeek's MTP layers, kept whole by grape) and ``layers``: one dict per
    decoder layer with ``layer``, ``experts`` (None for a dense layer),
    ``expert_parameters`` and ``expert_bytes``. With ``sparsity``, each layer also has
    ``zero_fraction`` (all of its tensors) and ``zero_fraction_by_type``, and the model has
    ``sparsity``: ``{"zero_fraction": ..., "by_type": {type: {"zeros", "parameters",
    "zero_fraction"}}}``.

    Raises:
        CheckpointError: missing/unreadable config or weights, a corrupt or truncated
            safetensors file (named), a tensor missing from its shard, or expert counts in the
            weights that disagree with the config.
        grape_kernels.architectures.UnsupportedModelError: the config is not a supported MoE architecture.
    """
    layout = read_layout(path)
    folder, config, adapter, files, tensors = layout.folder, layout.config, layout.adapter, layout.files, layout.tensors
    n_layers = len(layout.experts)
    per_layer = _group_by_layer(tensors)

    def parameters_of(selected: list[TensorEntry]) -> int:  # model parameters, not stored elements
        return sum(logical_parameters(t.name, TensorInfo(t.dtype, t.shape), layout.format) for t in selected)

    layers = []
    for i, expected in enumerate(layout.experts):
        routed = [t for t in per_layer.get(i, []) if t.routed]
        layers.append(
            {
                "layer": i,
                "experts": expected,
                "expert_parameters": parameters_of(routed),
                "expert_bytes": sum(t.nbytes for t in routed),
            }
        )

    dtypes: dict[str, int] = {}
    for t in tensors:
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + parameters_of([t])
    parameters = parameters_of(tensors)
    mtp = [t for t in tensors if t.layer is not None and t.layer >= n_layers]
    info: dict[str, Any] = {
        "path": str(folder),
        "model_type": config.model_type,
        "architecture": adapter.name,
        "num_layers": n_layers,
        "top_k": adapter.top_k(config),
        "files": [f.name for f in files],
        "parameters": parameters,
        "tensor_bytes": sum(t.nbytes for t in tensors),
        "file_bytes": sum(f.stat().st_size for f in files),
        "total_experts": sum(c for c in layout.experts if c is not None),
        "routed_expert_parameters": sum(layer["expert_parameters"] for layer in layers),
        "routed_expert_bytes": sum(layer["expert_bytes"] for layer in layers),
        "dtypes": dtypes,
        "quantization": layout.format.method,
        "mtp_parameters": parameters_of(mtp),
        "layers": layers,
    }
    if sparsity:
        _add_sparsity(info, tensors, layout.format)
    return info


RATIO_KEYS = (
    "parameters",
    "file_bytes",
    "total_experts",
    "routed_expert_parameters",
    "routed_expert_bytes",
)


def compare_info(
    before_path: str | os.PathLike[str],
    after_path: str | os.PathLike[str],
    *,
    sparsity: bool = False,
) -> dict:
    """:func:`model_info` of two checkpoints (e.g. original and pruned) and after/before ratios.

    Returns ``{"before": info, "after": info, "ratio": {key: after / before}}`` for the keys
    ``parameters``, ``file_bytes``, ``total_experts``, ``routed_expert_parameters`` and
    ``routed_expert_bytes`` (None where the before value is 0).

    Raises:
        ValueError: the two models have different numbers of decoder layers (a per-layer
            comparison would be meaningless), plus everything :func:`model_info` raises.
    """
    before = model_info(before_path, sparsity=sparsity)
    after = model_info(after_path, sparsity=sparsity)
    if before["num_layers"] != after["num_layers"]:
        raise ValueError(
            f"cannot compare {before['path']} ({before['num_layers']} layers) with "
            f"{after['path']} ({after['num_layers']} layers)"
        )
    ratio = {k: after[k] / before[k] if before[k] else None for k in RATIO_KEYS}
    return {"before": before, "after": after, "ratio": ratio}
