"""Which weight format a checkpoint declares, and whether its tensors really are in it.

grape reads three formats exactly and refuses every other one by name, before any heavy work:

- **unquantized** (no ``quantization_config``): float tensors (F32/F16/BF16).
- **block-scaled FP8** (``quant_method: fp8`` with ``weight_block_size: [bm, bn]``; the
  DeepSeek-V3/R1 and Qwen3-*-FP8 releases): a quantized linear stores ``X.weight`` as
  F8_E4M3 plus ``X.weight_scale_inv`` (F32, or BF16), one scale per ``bm x bn`` block, grid
  ``(ceil(rows/bm), ceil(cols/bn))``. ``scale_fmt: ue8m0`` (power-of-two scales, DeepSeek-V3.1)
  is read too, with scales stored as F32, as U8 exponent bytes or as F8_E8M0. Everything else
  (embeddings, norms, routers, ``modules_to_not_convert``) stays a float tensor.
- **MXFP4** (``quant_method: mxfp4``, GPT-OSS only, the one architecture transformers reads it
  for): a routed-expert projection ``...mlp.experts.P`` is stored as ``P_blocks`` U8
  ``(E, rows, cols/32, 16)`` (two E2M1 values per byte) plus ``P_scales`` U8 ``(E, rows, cols/32)``
  (E8M0 exponents); biases, attention and router stay float.

Refused by name: every other ``quant_method`` (compressed-tensors, gptq, awq, bitsandbytes,
fbgemm_fp8, torchao, hqq, quark, ...), and FP8/MXFP4 variants whose values grape cannot
reproduce exactly: per-tensor FP8 (no ``weight_block_size``), static activation scales
(``activation_scheme: static`` or ``activation_scale``/``input_scale`` tensors: transformers
applies them on GPU and drops them on CPU, so the two disagree), E5M2 (``fmt: e5m2``),
FP4-packed FP8 experts (``expert_dtype: fp4``), FP8 embeddings (``modules_to_convert``), and
any ``quantization_config`` key grape does not know (it might change what the bytes mean).
A checkpoint whose tensors contradict its declaration (an F8 tensor in a checkpoint that
declares no quantization, an FP8 weight without its scale, a scale grid of the wrong shape)
is refused too: a quantized tensor is never silently cast.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

__all__ = [
    "FP8",
    "MXFP4",
    "NONE",
    "QuantFormat",
    "SUPPORTED_FORMATS",
    "TensorInfo",
    "UnsupportedQuantizationError",
    "check_tensors",
    "detect_format",
    "logical_parameters",
    "refuse_training",
    "scale_grid",
    "tensor_infos",
]

NONE, FP8, MXFP4 = "none", "fp8", "mxfp4"

SUPPORTED_FORMATS = (
    "grape reads unquantized checkpoints, block-scaled FP8 (quant_method 'fp8' with weight_block_size, "
    "as DeepSeek-V3/R1 and Qwen3-*-FP8 release it) and MXFP4 (quant_method 'mxfp4', GPT-OSS)"
)

_FP8_KEYS = {
    "quant_method", "fmt", "activation_scheme", "weight_block_size", "modules_to_not_convert",
    "ignored_layers", "scale_fmt", "dequantize", "expert_dtype", "modules_to_convert",
}
_MXFP4_KEYS = {"quant_method", "modules_to_not_convert", "dequantize"}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_INDEX_DTYPES = {"I64", "I32", "I16", "BOOL"}  # buffers such as position ids
_FP8_SCALE_DTYPES = {"float": {"F32", "BF16"}, "ue8m0": {"F32", "U8", "F8_E8M0"}}
_MXFP4_PROJECTIONS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)_(blocks|scales)$")
_ACTIVATION_SCALE = re.compile(r"\.(activation_scale|input_scale)$")


class UnsupportedQuantizationError(ValueError):
    """A checkpoint's weight format is one grape does not read exactly (the message says which)."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as a safetensors header describes it (dtype string such as ``"F8_E4M3"``)."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class QuantFormat:
    """The weight format of a checkpoint, as declared by ``config.json``.

    ``config`` is the ``quantization_config`` dict exactly as read; a checkpoint grape writes in
    the same format carries it unchanged.
    """

    method: str = NONE
    block_size: tuple[int, int] | None = None
    scale_fmt: str = "float"
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_quantized(self) -> bool:
        return self.method != NONE


def _refuse(message: str) -> UnsupportedQuantizationError:
    return UnsupportedQuantizationError(f"{message}; {SUPPORTED_FORMATS}")


def detect_format(config: Any) -> QuantFormat:
    """The format declared by a config (a transformers config object or the ``config.json`` dict).

    Raises :class:`UnsupportedQuantizationError` with one line naming what is not supported.
    """
    raw = config.get("quantization_config") if isinstance(config, Mapping) else getattr(config, "quantization_config", None)
    if raw is None:
        return QuantFormat()
    if not isinstance(raw, Mapping):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else vars(raw)
    method = str(raw.get("quant_method", "")).lower()
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if method == FP8:
        return _fp8_format(dict(raw))
    if method == MXFP4:
        unknown = sorted(set(raw) - _MXFP4_KEYS)
        if unknown:
            raise _refuse(f"MXFP4 quantization_config key(s) {unknown} are not understood by grape")
        if model_type != "gpt_oss":
            raise _refuse(f"MXFP4 is read for GPT-OSS only (transformers reads it for no other architecture), not {model_type!r}")
        return QuantFormat(method=MXFP4, config=dict(raw))
    raise _refuse(f"quantization method {method or raw!r} is not supported")


def _fp8_format(raw: dict) -> QuantFormat:
    unknown = sorted(set(raw) - _FP8_KEYS)
    if unknown:
        raise _refuse(f"FP8 quantization_config key(s) {unknown} are not understood by grape")
    fmt = str(raw.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise _refuse(f"FP8 format {fmt!r} is not supported (only e4m3)")
    block = raw.get("weight_block_size")
    if block is None:
        raise _refuse("per-tensor FP8 (no weight_block_size) is not supported, only block-scaled FP8")
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise _refuse(f"FP8 weight_block_size {block!r} is not two positive integers")
    scheme = str(raw.get("activation_scheme", "dynamic")).lower()
    if scheme != "dynamic":
        raise _refuse(f"FP8 activation_scheme {scheme!r} is not supported (static activation scales change the results)")
    scale_fmt = str(raw.get("scale_fmt") or "float")
    if scale_fmt not in _FP8_SCALE_DTYPES:
        raise _refuse(f"FP8 scale_fmt {scale_fmt!r} is not supported")
    if str(raw.get("expert_dtype") or "fp8") != "fp8":
        raise _refuse(f"FP8 checkpoints with expert_dtype {raw['expert_dtype']!r} (FP4-packed experts) are not supported")
    if raw.get("modules_to_convert"):
        raise _refuse("FP8 checkpoints with quantized embeddings (modules_to_convert) are not supported")
    return QuantFormat(method=FP8, block_size=(block[0], block[1]), scale_fmt=scale_fmt, config=raw)


def refuse_training(fmt: QuantFormat, what: str) -> None:
    """Refuse to train (distill) weights stored in a quantized format, naming the format and why.

    A distillation update is far below the formats' resolution (measured by
    ``benchmarks/quant_requant_error.py``): FP8 keeps 4 % of an update of relative size 1e-3, and
    re-quantizing MXFP4 moves a weight by 3-26 times the update, so the student written back
    would not be the student that was trained.
    """
    if fmt.is_quantized:
        raise UnsupportedQuantizationError(
            f"{what} is stored as {fmt.method}: distillation updates are below that format's resolution "
            "(re-quantizing keeps 4 % of a 1e-3 update in FP8 and moves MXFP4 weights 3-26x the update), so "
            "grape does not train it; distill an unquantized copy (e.g. saved by transformers after loading it)"
        )


def scale_grid(shape: tuple[int, ...], block_size: tuple[int, int]) -> tuple[int, int]:
    """Shape of the ``weight_scale_inv`` of a 2-D FP8 weight: one scale per (partial) block."""
    rows, cols = shape
    return (-(-rows // block_size[0]), -(-cols // block_size[1]))


def check_tensors(fmt: QuantFormat, tensors: Mapping[str, TensorInfo]) -> None:
    """Refuse a checkpoint whose tensors are not in the format its config declares.

    ``tensors`` maps every checkpoint tensor name to its header entry. Reads no tensor data.
    """
    for name in tensors:
        if _ACTIVATION_SCALE.search(name):
            raise _refuse(f"tensor {name} is a static activation scale, which grape cannot apply exactly")
    if fmt.method == FP8:
        _check_fp8(fmt, tensors)
    elif fmt.method == MXFP4:
        _check_mxfp4(tensors)
    else:
        for name, info in tensors.items():
            if info.dtype not in _FLOAT_DTYPES | _INDEX_DTYPES:
                raise _refuse(
                    f"tensor {name} is {info.dtype} but config.json declares no quantization_config; "
                    "grape never casts quantized values without their format"
                )


def _check_fp8(fmt: QuantFormat, tensors: Mapping[str, TensorInfo]) -> None:
    scale_dtypes = _FP8_SCALE_DTYPES[fmt.scale_fmt]
    for name, info in tensors.items():
        if name.endswith(".weight_scale_inv"):
            weight = tensors.get(name.removesuffix("_scale_inv"))
            if weight is None or weight.dtype != "F8_E4M3":
                raise _refuse(f"scale {name} has no F8_E4M3 weight beside it")
            if info.dtype not in scale_dtypes:
                raise _refuse(f"scale {name} is {info.dtype}; scale_fmt {fmt.scale_fmt!r} stores {sorted(scale_dtypes)}")
            if len(weight.shape) != 2:
                raise _refuse(f"FP8 weight {name.removesuffix('_scale_inv')} has shape {weight.shape}; grape reads 2-D FP8 weights")
            expected = scale_grid(weight.shape, fmt.block_size)
            if tuple(info.shape) != expected:
                raise _refuse(
                    f"scale {name} has shape {tuple(info.shape)}, not {expected} (one per {fmt.block_size} block "
                    f"of a {tuple(weight.shape)} weight)"
                )
        elif info.dtype == "F8_E4M3":
            if not name.endswith(".weight") or f"{name}_scale_inv" not in tensors:
                raise _refuse(f"F8_E4M3 tensor {name} has no weight_scale_inv beside it")
        elif info.dtype not in _FLOAT_DTYPES | _INDEX_DTYPES:
            raise _refuse(f"tensor {name} is {info.dtype}, which a block-scaled FP8 checkpoint does not hold")


def _check_mxfp4(tensors: Mapping[str, TensorInfo]) -> None:
    for name, info in tensors.items():
        match = _MXFP4_PROJECTIONS.search(name)
        if match is None:
            if info.dtype not in _FLOAT_DTYPES | _INDEX_DTYPES:
                raise _refuse(f"tensor {name} is {info.dtype}, which an MXFP4 (GPT-OSS) checkpoint does not hold there")
            continue
        if info.dtype != "U8":
            raise _refuse(f"MXFP4 tensor {name} is {info.dtype}, not U8")
        if match.group(2) == "blocks":
            scales = tensors.get(name.removesuffix("_blocks") + "_scales")
            if len(info.shape) != 4 or info.shape[-1] != 16:
                raise _refuse(f"MXFP4 blocks {name} have shape {info.shape}, not (experts, rows, cols/32, 16)")
            if scales is None or tuple(scales.shape) != tuple(info.shape[:-1]):
                raise _refuse(f"MXFP4 blocks {name} have no scales of shape {tuple(info.shape[:-1])} beside them")
        elif name.removesuffix("_scales") + "_blocks" not in tensors:
            raise _refuse(f"MXFP4 scales {name} have no blocks beside them")


def logical_parameters(name: str, info: TensorInfo, fmt: QuantFormat) -> int:
    """How many model parameters a checkpoint tensor holds (not bytes).

    An FP8 weight holds one parameter per byte; MXFP4 blocks hold two per byte; block scales
    (``weight_scale_inv``, ``*_scales``) are format overhead and hold none.
    """
    if fmt.method == FP8 and name.endswith(".weight_scale_inv"):
        return 0
    if fmt.method == MXFP4 and _MXFP4_PROJECTIONS.search(name):
        return 0 if name.endswith("_scales") else 2 * info.numel
    return info.numel


def tensor_infos(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory with its header dtype and shape; reads no tensor data."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    infos = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as handle:
            for key in handle.keys():
                header = handle.get_slice(key)
                infos[key] = TensorInfo(header.get_dtype(), tuple(header.get_shape()))
    return infos
