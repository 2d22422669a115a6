"""What a checkpoint holds, read from ``config.json`` and safetensors headers alone.

``grape info`` answers "how many experts does each layer keep, and how big is the model really"
for checkpoints far larger than memory, so nothing here instantiates a model or loads weights:
shapes and dtypes come from the safetensors headers (``safe_open(...).get_slice``). Only the
optional sparsity count reads tensor data, one tensor (and one bounded chunk of rows) at a
time, so its peak memory is one chunk whatever the checkpoint size.

Routed-expert tensors are recognised by name in both layouts transformers writes:
per-expert (``...layers.L.<block>.experts.J.<proj>.weight``, e.g. Mixtral's ``w1/w2/w3`` or
Qwen's ``gate_proj/up_proj/down_proj``) and fused 3-D (``...layers.L.<block>.experts.gate_up_proj``
with experts on the first axis, e.g. GPT-OSS or grape's ragged checkpoints). Shared experts
(``shared_expert``/``shared_experts``) are not routed experts and are never counted as such.
The expert count found in the weights is checked against the config, so a checkpoint whose
config and weights disagree is reported as broken instead of being summarised wrongly.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from grape.model_io import CheckpointError, load_config
from grape.report import format_table
from grape_kernels.architectures import MoEAdapter, get_adapter

__all__ = [
    "TENSOR_TYPES",
    "model_info",
    "compare_info",
    "format_info",
    "format_comparison",
]

TENSOR_TYPES = ("gate_up_proj", "down_proj", "attention", "other")
"""Sparsity categories: routed experts' two projections, attention, everything else."""

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# ``(?:.+\.)?experts\.`` needs "experts" to be a whole name segment, so ``shared_experts.``
# (DeepSeek) and ``shared_expert.`` (Qwen2-MoE) never match.
_ROUTED = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?experts\.(?:(\d+)\.)?([^.]+)")
_GATE_UP_NAMES = ("w1", "w3", "gate_proj", "up_proj")
_DOWN_NAMES = ("w2",)
_ATTENTION = re.compile(r"(?:^|\.)(self_attn|attention|attn)\.")

# Bits per element of every dtype string a safetensors header can carry.
_DTYPE_BITS = {
    "F64": 64, "I64": 64, "U64": 64,
    "F32": 32, "I32": 32, "U32": 32,
    "F16": 16, "BF16": 16, "I16": 16, "U16": 16,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I8": 8, "U8": 8, "BOOL": 8,
    "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}  # fmt: skip

# Elements read at once by the sparsity count: bounds peak memory on huge fused tensors.
_ZERO_COUNT_CHUNK = 1 << 24


def _tensor_type(name: str) -> str:
    """Sparsity category of a tensor, from its name."""
    routed = _ROUTED.search(name)
    if routed:
        proj = routed.group(3)
        if proj.startswith("gate_up_proj") or proj in _GATE_UP_NAMES:
            return "gate_up_proj"
        if proj.startswith("down_proj") or proj in _DOWN_NAMES:
            return "down_proj"
        return "other"
    return "attention" if _ATTENTION.search(name) else "other"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint and, if sharded, its tensor -> file map."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no 'weight_map'")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index_path} lists shard(s) that do not exist: {missing}")
        return files, weight_map
    single = folder / "model.safetensors"
    if single.is_file():
        return [single], None
    raise CheckpointError(
        f"{folder} has no safetensors weights (model.safetensors or model.safetensors.index.json)"
    )


def _experts_from_config(
    config, adapter: MoEAdapter, config_path: Path
) -> list[int | None]:
    """Routed experts of every decoder layer according to the config (None: dense layer)."""
    n_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers < 1:
        raise CheckpointError(f"{config_path} has no valid 'num_hidden_layers'")
    per_layer = getattr(config, "grape_experts_per_layer", None)
    if per_layer is not None:
        valid = isinstance(per_layer, list) and len(per_layer) == n_layers and all(
            c is None or (isinstance(c, int) and not isinstance(c, bool) and c >= 1)
            for c in per_layer
        )
        if not valid:
            raise CheckpointError(
                f"{config_path}: 'grape_experts_per_layer' must list one positive count (or null "
                f"for a dense layer) per decoder layer ({n_layers}), got {per_layer!r}"
            )
        return list(per_layer)
    if not isinstance(getattr(config, adapter.count_key, None), int):
        raise CheckpointError(f"{config_path} has no integer {adapter.count_key!r}")
    moe_layers = set(adapter.moe_layer_indices(config))
    count = adapter.num_experts(config)
    return [count if i in moe_layers else None for i in range(n_layers)]


def _count_zeros(handle, name: str, shape: list[int]) -> int:
    """Exact zeros (+0.0 and -0.0) of one tensor, read in chunks of rows."""
    numel = math.prod(shape)
    if not shape or numel <= _ZERO_COUNT_CHUNK:
        chunks = [handle.get_tensor(name)]
    else:
        part = handle.get_slice(name)
        step = max(1, _ZERO_COUNT_CHUNK // (numel // shape[0]))
        chunks = (part[start : start + step] for start in range(0, shape[0], step))
    zeros = 0
    for chunk in chunks:
        if chunk.dtype.is_floating_point and chunk.dtype.itemsize == 1:
            chunk = chunk.float()  # float8 comparisons are not implemented on every backend
        zeros += int((chunk == 0).sum())
    return zeros


@dataclass(frozen=True)
class _TensorEntry:
    """What a safetensors header says about one tensor, plus what its name says."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: str
    layer: int | None
    routed: bool
    expert: int | None  # per-expert layout only; None for fused 3-D tensors
    kind: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BITS[self.dtype] // 8


def _scan_headers(
    files: list[Path], weight_map: dict[str, str] | None, n_layers: int
) -> list[_TensorEntry]:
    """Every tensor's header entry, checked against the config's layer count and the index."""
    tensors = []
    for file in files:
        try:
            handle_cm = safe_open(str(file), framework="pt")
        except Exception as exc:  # SafetensorError and OSError carry the reason
            raise CheckpointError(
                f"{file} is not a readable safetensors file (corrupt or truncated?): {exc}"
            ) from exc
        with handle_cm as handle:
            for name in handle.keys():
                part = handle.get_slice(name)
                dtype = part.get_dtype()
                if dtype not in _DTYPE_BITS:
                    raise CheckpointError(f"{file}: tensor {name} has unknown dtype {dtype}")
                layer_match = _LAYER.search(name)
                layer = int(layer_match.group(1)) if layer_match else None
                if layer is not None and layer >= n_layers:
                    raise CheckpointError(
                        f"{file}: tensor {name} belongs to layer {layer}, but the config has "
                        f"{n_layers} decoder layers"
                    )
                routed = _ROUTED.search(name)
                tensors.append(
                    _TensorEntry(
                        file=file,
                        name=name,
                        shape=tuple(part.get_shape()),
                        dtype=dtype,
                        layer=layer,
                        routed=routed is not None,
                        expert=int(routed.group(2)) if routed and routed.group(2) else None,
                        kind=_tensor_type(name),
                    )
                )
    if weight_map is not None:
        missing = sorted(set(weight_map) - {t.name for t in tensors})
        if missing:
            raise CheckpointError(
                f"{len(missing)} tensor(s) listed in model.safetensors.index.json are not in "
                f"their shard, e.g. {missing[:3]}"
            )
    return tensors


def _group_by_layer(tensors: list[_TensorEntry]) -> dict[int | None, list[_TensorEntry]]:
    groups: dict[int | None, list[_TensorEntry]] = {}
    for t in tensors:
        groups.setdefault(t.layer, []).append(t)
    return groups


def _add_sparsity(info: dict[str, Any], tensors: list[_TensorEntry], files: list[Path]) -> None:
    """Count exact zeros file by file, tensor by tensor, and add the fractions to ``info``."""
    zeros_of: dict[str, int] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for t in tensors:
                if t.file == file:
                    zeros_of[t.name] = _count_zeros(handle, t.name, list(t.shape))

    def fractions(selected: list[_TensorEntry]) -> dict[str, dict[str, Any]]:
        out = {}
        for kind in TENSOR_TYPES:
            of_kind = [t for t in selected if t.kind == kind]
            zeros, total = sum(zeros_of[t.name] for t in of_kind), sum(t.numel for t in of_kind)
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
    (:data:`TENSOR_TYPES`).

    Returns a dict with ``path``, ``model_type``, ``architecture``, ``num_layers``, ``top_k``,
    ``files``, ``parameters`` (all stored elements), ``tensor_bytes``, ``file_bytes`` (size on
    disk, headers included), ``total_experts``, ``routed_expert_parameters``,
    ``routed_expert_bytes``, ``dtypes`` (parameters per dtype) and ``layers``: one dict per
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
    folder = Path(path)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder")
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    config = load_config(folder)
    adapter = get_adapter(config)
    experts = _experts_from_config(config, adapter, config_path)
    files, weight_map = _weight_files(folder)
    n_layers = len(experts)
    tensors = _scan_headers(files, weight_map, n_layers)

    # Validate everything the headers can tell before the (optional) pass over the data.
    per_layer = _group_by_layer(tensors)
    layers = []
    for i, expected in enumerate(experts):
        routed = [t for t in per_layer.get(i, []) if t.routed]
        ids = {t.expert for t in routed if t.expert is not None}
        fused_sizes = {t.shape[0] for t in routed if t.expert is None and t.shape}
        found = sorted(fused_sizes | ({len(ids)} if ids else set()))
        if ids and ids != set(range(len(ids))):
            raise CheckpointError(
                f"{folder}: layer {i} has per-expert tensors for experts {sorted(ids)}; "
                "expected consecutive indices from 0"
            )
        if (expected is None and found) or (expected is not None and found != [expected]):
            raise CheckpointError(
                f"{folder}: layer {i} should have {expected} routed experts according to "
                f"config.json, but its weights hold {found or 'none'}"
            )
        layers.append(
            {
                "layer": i,
                "experts": expected,
                "expert_parameters": sum(t.numel for t in routed),
                "expert_bytes": sum(t.nbytes for t in routed),
            }
        )

    dtypes: dict[str, int] = {}
    for t in tensors:
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel
    parameters = sum(t.numel for t in tensors)
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
        "total_experts": sum(c for c in experts if c is not None),
        "routed_expert_parameters": sum(layer["expert_parameters"] for layer in layers),
        "routed_expert_bytes": sum(layer["expert_bytes"] for layer in layers),
        "dtypes": dtypes,
        "layers": layers,
    }
    if sparsity:
        _add_sparsity(info, tensors, files)
    return info


_RATIO_KEYS = (
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
    ratio = {k: after[k] / before[k] if before[k] else None for k in _RATIO_KEYS}
    return {"before": before, "after": after, "ratio": ratio}


def _human_bytes(n: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0 if n < 1024 else min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n} B" if power == 0 else f"{n / 1024**power:.2f} {units[power]}"


def format_info(info: dict) -> str:
    """A :func:`model_info` result as text: a summary followed by a per-layer markdown table."""
    lines = [
        f"{info['path']}: {info['architecture']} ({info['model_type']}), "
        f"{info['num_layers']} decoder layers, top-{info['top_k']} routing",
        f"parameters: {info['parameters']:,} ({_human_bytes(info['file_bytes'])} on disk in "
        f"{len(info['files'])} file(s); dtypes: {', '.join(sorted(info['dtypes']))})",
        f"routed experts: {info['total_experts']} in total, {info['routed_expert_parameters']:,} "
        f"parameters ({_human_bytes(info['routed_expert_bytes'])})",
    ]
    if "sparsity" in info:
        sparsity = info["sparsity"]
        by_type = ", ".join(
            f"{k} {v['zero_fraction']:.2%}" for k, v in sparsity["by_type"].items() if v["parameters"]
        )
        lines.append(f"zeros: {sparsity['zero_fraction']:.2%} of all parameters ({by_type})")
    rows = []
    for layer in info["layers"]:
        row = {
            "layer": layer["layer"],
            "experts": "dense" if layer["experts"] is None else layer["experts"],
            "expert params": layer["expert_parameters"],
            "expert size": _human_bytes(layer["expert_bytes"]),
        }
        if "zero_fraction" in layer:
            row["zeros"] = f"{layer['zero_fraction']:.2%}"
            row["expert zeros"] = _expert_zero_text(layer["zero_fraction_by_type"])
        rows.append(row)
    columns = ["layer", "experts", "expert params", "expert size"]
    if "sparsity" in info:
        columns += ["zeros", "expert zeros"]
    return "\n".join(lines) + "\n\n" + format_table(rows, columns)


def _expert_zero_text(by_type: dict[str, float]) -> str:
    parts = [f"{k} {by_type[k]:.2%}" for k in ("gate_up_proj", "down_proj") if k in by_type]
    return ", ".join(parts)


def format_comparison(comparison: dict) -> str:
    """A :func:`compare_info` result as text: totals with ratios, then experts per layer."""
    before, after, ratio = comparison["before"], comparison["after"], comparison["ratio"]
    summary = [
        {
            "": key.replace("_", " "),
            "before": before[key],
            "after": after[key],
            "after / before": ratio[key],
        }
        for key in _RATIO_KEYS
    ]
    if "sparsity" in before and "sparsity" in after:
        summary.append(
            {
                "": "zero fraction",
                "before": before["sparsity"]["zero_fraction"],
                "after": after["sparsity"]["zero_fraction"],
            }
        )
    layers = [
        {
            "layer": b["layer"],
            "experts before": "dense" if b["experts"] is None else b["experts"],
            "experts after": "dense" if a["experts"] is None else a["experts"],
            "expert params before": b["expert_parameters"],
            "expert params after": a["expert_parameters"],
        }
        for b, a in zip(before["layers"], after["layers"])
    ]
    return (
        f"before: {before['path']}\nafter:  {after['path']}\n\n"
        + format_table(summary, ["", "before", "after", "after / before"])
        + "\n\n"
        + format_table(
            layers,
            [
                "layer",
                "experts before",
                "experts after",
                "expert params before",
                "expert params after",
            ],
        )
    )
