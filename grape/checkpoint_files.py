"""Reading checkpoint folders: weight files, the shard index, safetensors headers, tensor names.

Everything that knows how a transformers checkpoint is laid out on disk lives here, for the
three readers grape has: :class:`grape.model_io.LazyCausalLM` (loads one layer at a time),
:mod:`grape.info` (summarises from headers alone) and :func:`grape.checkpoint.load_pruned`
(checks a ragged checkpoint before transformers builds it). Headers are parsed here, not by
mapping the file, so a truncated download is an error naming the file instead of a crash when
a tensor past the end is touched.

Routed-expert tensors come in two layouts: fused 3-D (``...layers.L.mlp.experts.gate_up_proj``,
experts first; transformers 5 modules, GPT-OSS, grape's own checkpoints) and one tensor per
expert (``...experts.J.w1.weight`` or ``...experts.J.gate_proj.weight``, Mixtral under
``block_sparse_moe``), which :class:`CheckpointIndex` stacks into the fused parameter. Shared
experts (``shared_expert``/``shared_experts``) are never routed experts.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from grape.errors import InputError
from grape.quant.formats import QuantFormat, TensorInfo, check_tensors, detect_format
from grape.quant.layout import read_mxfp4_experts, read_parameter
from grape.quant.mtp import mtp_layer_indices
from grape.tensor_io import TORCH_DTYPES, read_tensor
from grape_kernels.architectures import MoEAdapter, get_adapter
from grape_kernels.ragged_modeling import GRAPE_COUNTS_KEY

__all__ = [
    "CheckpointError",
    "DTYPE_BITS",
    "SAFETENSORS_DTYPES",
    "TensorEntry",
    "CheckpointIndex",
    "CheckpointLayout",
    "TOKENIZER_FILES",
    "load_config",
    "source_format",
    "weight_files",
    "weight_files_present",
    "read_header",
    "read_layout",
    "tensor_type",
]


class CheckpointError(InputError):
    """A model directory is missing, incomplete, corrupt or internally inconsistent."""


DTYPE_BITS = {
    "F64": 64, "I64": 64, "U64": 64,
    "F32": 32, "I32": 32, "U32": 32,
    "F16": 16, "BF16": 16, "I16": 16, "U16": 16,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I8": 8, "U8": 8, "BOOL": 8,
    "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}  # fmt: skip
"""Bits per element of every dtype string a safetensors header can carry."""

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}
"""The safetensors dtype string of every torch dtype a written tensor may have."""

PER_EXPERT_PARTS = {
    # fused parameter -> the per-expert tensor names it is made of (concatenated along dim 0)
    "gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
    "down_proj": (("w2",), ("down_proj",)),
}

TENSOR_TYPES = ("gate_up_proj", "down_proj", "attention", "other")
"""Categories of tensors: routed experts' two projections, attention, everything else."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
"""The files that make up a model's tokenizer (and generation defaults): copied into outputs."""

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# ``(?:.+\.)?experts\.`` needs "experts" to be a whole name segment, so ``shared_experts.``
# (DeepSeek) and ``shared_expert.`` (Qwen2-MoE) never match.
_ROUTED = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?experts\.(?:(\d+)\.)?([^.]+)")
_ATTENTION = re.compile(r"(?:^|\.)(self_attn|attention|attn)\.")
_PARTS_OF = {kind: {name for layout in layouts for name in layout} for kind, layouts in PER_EXPERT_PARTS.items()}
_INDEX = "model.safetensors.index.json"
_FLOAT_AND_INDEX = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "BOOL"}


def tensor_type(name: str) -> str:
    """Which of :data:`TENSOR_TYPES` a tensor is, from its name."""
    routed = _ROUTED.search(name)
    if routed:
        proj = routed.group(3)
        for kind, parts in _PARTS_OF.items():
            if proj.startswith(kind) or proj in parts:
                return kind
        return "other"
    return "attention" if _ATTENTION.search(name) else "other"


@dataclass(frozen=True)
class TensorEntry:
    """What a safetensors header says about one tensor, plus what its name says."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int = 0  # of the tensor's first byte in the file

    def read(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The stored tensor (or rows ``start:stop`` of it), read with plain file I/O (:mod:`grape.tensor_io`)."""
        return read_tensor(self.file, self.offset, self.dtype, self.shape, rows)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BITS[self.dtype] // 8

    @property
    def layer(self) -> int | None:
        match = _LAYER.search(self.name)
        return int(match.group(1)) if match else None

    @property
    def routed(self) -> bool:
        return _ROUTED.search(self.name) is not None

    @property
    def expert(self) -> int | None:
        """The expert index of a per-expert tensor; None for fused (and non-expert) tensors."""
        match = _ROUTED.search(self.name)
        return int(match.group(2)) if match and match.group(2) else None

    @property
    def kind(self) -> str:
        return tensor_type(self.name)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def load_config(model_dir: Path):
    """The transformers config of ``model_dir``; an unreadable ``config.json`` is one clear error."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"cannot read {model_dir / 'config.json'}: {exc}; is it a transformers model directory?"
        ) from exc


def source_format(model_dir: Path) -> QuantFormat:
    """The weight format ``model_dir/config.json`` declares, read from the file itself.

    transformers' config keeps ``quantization_config`` only until a quantized model is loaded, so
    the file is the one place that says it (and what a written checkpoint copies verbatim).

    Raises:
        grape.quant.formats.UnsupportedQuantizationError: a format grape does not read exactly.
    """
    return detect_format(_read_json(model_dir / "config.json"))


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint and, if sharded, its tensor -> file map."""
    index = folder / _INDEX
    if index.is_file():
        weight_map = (_read_json(index) or {}).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing}")
        return files, weight_map
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no safetensors weights (model.safetensors or {_INDEX})")
    return files, None


def weight_files_present(folder: Path) -> bool:
    """Whether every weight file of ``folder`` is there (a folder of only ``config.json``: False)."""
    index = folder / _INDEX
    if index.is_file():
        weight_map = (_read_json(index) or {}).get("weight_map") or {}
        return bool(weight_map) and all((folder / name).is_file() for name in set(weight_map.values()))
    return any(folder.glob("*.safetensors"))


def read_header(path: Path) -> list[TensorEntry]:
    """Every tensor a safetensors file's header lists, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or not 2 <= length <= size - 8:
                raise ValueError(f"header length {length} does not fit the file's {size} bytes")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        entries = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if dtype not in DTYPE_BITS:
                raise ValueError(f"tensor {name} has unknown dtype {dtype}")
            entry = TensorEntry(path, name, shape, dtype, 8 + length + start)
            if end - start != entry.nbytes or 8 + length + end > size:
                raise ValueError(f"tensor {name} needs bytes {start}..{end} past the data's {size - 8 - length}")
            entries.append(entry)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc
    return entries


def _name_variants(name: str) -> list[str]:
    """Names a parameter may have in a checkpoint (Mixtral's legacy ``block_sparse_moe``)."""
    variants = [name]
    if ".mlp." in name:
        variants.append(name.replace(".mlp.", ".block_sparse_moe.", 1))
    return variants


class CheckpointIndex:
    """Which file holds which tensor (headers checked up front), and reading tensors by name.

    Reads are plain file reads of exactly the bytes asked for (:mod:`grape.tensor_io`): no shard
    stays memory-mapped, so a finished layer's pages are not part of the process's memory.
    ``fmt`` is the checkpoint's weight format (:func:`grape.quant.formats.detect_format`): an FP8
    weight is dequantized with its ``weight_scale_inv`` and GPT-OSS's MXFP4 expert blocks with
    their scales, bit for bit as transformers does (:mod:`grape.quant.layout`).
    """

    def __init__(self, model_dir: Path, fmt: QuantFormat | None = None):
        self.model_dir = model_dir
        self.format = fmt or QuantFormat()
        files, weight_map = weight_files(model_dir)
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            for entry in read_header(path):
                self.entries[entry.name] = entry
        missing = sorted(set(weight_map or ()) - set(self.entries))
        if missing:
            raise CheckpointError(
                f"{len(missing)} tensor(s) listed in {_INDEX} are not in their shard, e.g. {missing[:3]}"
            )
        self._files = files

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def files(self) -> list[Path]:
        return list(self._files)

    def tensor_infos(self) -> dict[str, TensorInfo]:
        """Every tensor's header dtype and shape, as :func:`grape.quant.formats.check_tensors` takes them."""
        return {name: TensorInfo(e.dtype, e.shape) for name, e in self.entries.items()}

    def get(self, key: str) -> torch.Tensor:
        """Checkpoint tensor ``key`` exactly as stored."""
        return self.entries[key].read()

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of checkpoint tensor ``key``, reading only those bytes."""
        return self.entries[key].read((start, stop))

    def sources_for(self, param_name: str) -> list[str] | None:
        """Checkpoint keys that make up module parameter ``param_name`` (None when absent)."""
        for candidate in _name_variants(param_name):
            if candidate in self:
                return [candidate]
            if f"{candidate}_blocks" in self:  # MXFP4 experts (GPT-OSS): blocks + scales
                return [f"{candidate}_blocks", f"{candidate}_scales"]
        for candidate in _name_variants(param_name):
            head, _, leaf = candidate.rpartition(".experts.")
            for parts in PER_EXPERT_PARTS.get(leaf, ()):
                keys = self._per_expert_keys(f"{head}.experts", parts)
                if keys:
                    return keys
        return None

    def _per_expert_keys(self, prefix: str, parts: tuple[str, ...]) -> list[str]:
        keys = []
        index = 0
        while all(f"{prefix}.{index}.{p}.weight" in self for p in parts):
            keys.extend(f"{prefix}.{index}.{p}.weight" for p in parts)
            index += 1
        return keys

    def is_quantized(self, key: str) -> bool:
        """Whether checkpoint tensor ``key`` is stored in a quantized format (bytes that need their scales)."""
        return key.endswith(("_blocks", "_scales", "_scale_inv")) or self.entries[key].dtype not in _FLOAT_AND_INDEX

    def load(self, param_name: str, dtype: torch.dtype | None = None, experts: range | None = None) -> torch.Tensor | None:
        """The tensor for module parameter ``param_name`` (None when the checkpoint has none).

        Per-expert tensors are stacked into the fused parameter and quantized ones dequantized,
        straight into ``dtype`` (floating-point results only; None keeps an unquantized tensor's
        stored dtype). ``experts`` reads only that contiguous range of a routed-experts parameter.
        """
        keys = self.sources_for(param_name)
        if keys is None:
            return None
        if keys[0].endswith("_blocks"):
            if dtype is None:
                raise CheckpointError(f"{param_name} is stored as MXFP4; it is read only into a given floating-point dtype")
            return read_mxfp4_experts(self, keys[0].removesuffix("_blocks"), dtype, experts)
        if len(keys) == 1 and self.entries[keys[0]].expert is None:
            key = keys[0]
            if experts is None:
                return self._read(key, dtype)
            value = self.get_rows(key, experts.start, experts.stop)
            return value.to(dtype) if dtype is not None and value.is_floating_point() else value
        return self._stacked(param_name, keys, dtype, experts)

    def _read(self, key: str, dtype: torch.dtype | None) -> torch.Tensor:
        if dtype is None:
            if self.is_quantized(key) or f"{key}_scale_inv" in self:
                raise CheckpointError(f"{key} is stored quantized; it is read only into a given floating-point dtype")
            return self.get(key)
        return read_parameter(self, key, self.format, dtype)

    def _stacked(self, param_name: str, keys: list[str], dtype: torch.dtype | None, experts: range | None) -> torch.Tensor:
        """Per-expert tensors ``[expert j: part 0, part 1, ...]`` as one (E, rows, cols) tensor, filled in place."""
        leaf = param_name.rpartition(".experts.")[2]
        per_expert = len(PER_EXPERT_PARTS[leaf][0])
        count = len(keys) // per_expert
        experts = experts if experts is not None else range(count)
        parts = [self.entries[k] for k in keys[:per_expert]]
        rows = sum(p.shape[0] for p in parts)
        stored = TORCH_DTYPES[parts[0].dtype]
        out = torch.empty((len(experts), rows, parts[0].shape[1]), dtype=dtype or stored)
        for slot, expert in enumerate(experts):
            start = 0
            for key in keys[expert * per_expert : (expert + 1) * per_expert]:
                value = self._read(key, dtype)
                out[slot, start : start + value.shape[0]] = value
                start += value.shape[0]
        return out


@dataclass(frozen=True)
class CheckpointLayout:
    """A checkpoint folder whose config and weights agree: what :func:`read_layout` returns."""

    folder: Path
    config: object  # the transformers config
    adapter: MoEAdapter
    files: list[Path]
    tensors: list[TensorEntry]
    experts: list[int | None]  # routed experts per decoder layer (None: dense)
    format: QuantFormat  # the weight format config.json declares


def _experts_from_config(config, adapter: MoEAdapter, config_path: Path) -> list[int | None]:
    """Routed experts of every decoder layer according to the config (None: dense layer)."""
    n_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers < 1:
        raise CheckpointError(f"{config_path} has no valid 'num_hidden_layers'")
    per_layer = getattr(config, GRAPE_COUNTS_KEY, None)
    if per_layer is not None:
        valid = isinstance(per_layer, list) and len(per_layer) == n_layers and all(
            c is None or (isinstance(c, int) and not isinstance(c, bool) and c >= 1) for c in per_layer
        )
        if not valid:
            raise CheckpointError(
                f"{config_path}: '{GRAPE_COUNTS_KEY}' must list one positive count (or null for a dense "
                f"layer) per decoder layer ({n_layers}), got {per_layer!r}"
            )
        _check_per_layer_config(config, adapter.count_key, per_layer, config_path)
        return list(per_layer)
    if not isinstance(getattr(config, adapter.count_key, None), int):
        raise CheckpointError(f"{config_path} has no integer {adapter.count_key!r}")
    moe_layers = set(adapter.moe_layer_indices(config))
    count = adapter.num_experts(config)
    return [count if i in moe_layers else None for i in range(n_layers)]


def _check_per_layer_config(config, count_key: str, counts: list[int | None], config_path: Path) -> None:
    """transformers' ``per_layer_config`` (written beside grape's list) must not say otherwise."""
    overrides = config.to_dict().get("per_layer_config") or {}
    for key, layer in overrides.items():
        said = layer.get(count_key) if isinstance(layer, dict) else None
        if said is None:
            continue
        i = int(key) if str(key).isdigit() else -1
        if not 0 <= i < len(counts) or said != counts[i]:
            raise CheckpointError(
                f"{config_path}: per_layer_config gives layer {key} {said} routed experts, "
                f"'{GRAPE_COUNTS_KEY}' gives {counts[i] if 0 <= i < len(counts) else 'no such layer'}"
            )


def read_layout(path: str | Path) -> CheckpointLayout:
    """Config and safetensors headers of a checkpoint folder, checked against each other.

    Raises:
        CheckpointError: missing/unreadable config or weights, a corrupt or truncated file
            (named), a tensor missing from its shard, a tensor of a layer the config does not
            have, or routed-expert counts in the weights that disagree with the config.
        grape_kernels.architectures.UnsupportedModelError: not a supported MoE architecture.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json")
    config = load_config(folder)
    adapter = get_adapter(config)
    fmt = source_format(folder)
    experts = _experts_from_config(config, adapter, folder / "config.json")
    files, weight_map = weight_files(folder)
    tensors = [entry for file in files for entry in read_header(file)]
    check_tensors(fmt, {t.name: TensorInfo(t.dtype, t.shape) for t in tensors})
    extra = mtp_layer_indices(config)  # DeepSeek's MTP layers follow the decoder layers
    for t in tensors:
        if t.layer is not None and t.layer >= len(experts) and t.layer not in extra:
            raise CheckpointError(
                f"{t.file}: tensor {t.name} belongs to layer {t.layer}, but the config has {len(experts)} decoder layers"
            )
    missing = sorted(set(weight_map or ()) - {t.name for t in tensors})
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) listed in {_INDEX} are not in their shard, e.g. {missing[:3]}")
    for i, expected in enumerate(experts):
        routed = [t for t in tensors if t.layer == i and t.routed]
        ids = {t.expert for t in routed if t.expert is not None}
        found = sorted({t.shape[0] for t in routed if t.expert is None and t.shape} | ({len(ids)} if ids else set()))
        if ids and ids != set(range(len(ids))):
            raise CheckpointError(
                f"{folder}: layer {i} has per-expert tensors for experts {sorted(ids)}; expected consecutive indices from 0"
            )
        if (expected is None and found) or (expected is not None and found != [expected]):
            raise CheckpointError(
                f"{folder}: layer {i} should have {expected} routed experts according to config.json, "
                f"but its weights hold {found or 'none'}"
            )
    return CheckpointLayout(folder, config, adapter, files, tensors, experts, fmt)
