"""Where quantized tensors live in a checkpoint, and how grape reads, copies and rewrites them.

Names are the release layouts, which are also what transformers 5.24 loads:

- **FP8** (DeepSeek-V3/R1, Qwen3-*-FP8): every quantized linear is ``X.weight`` (F8_E4M3) +
  ``X.weight_scale_inv``; routed experts are stored one per index,
  ``...mlp.experts.J.{gate,up,down}_proj.weight`` (+ scale). transformers dequantizes each
  tensor on its own first and only then fuses (``quantizers/base.py`` l. 343-380 put
  ``Fp8Dequantize`` in front of the model's ``MergeModulelist(dim=0), Concatenate(dim=1)``
  converter, ``conversion_mapping.py`` l. 1386-1399): the 3-D ``experts.gate_up_proj`` parameter
  is ``stack_j(cat(deq(gate_j), deq(up_j)))`` and ``down_proj`` is ``stack_j(deq(down_j))``.
  Block grids therefore never straddle gate and up. :func:`read_parameter` reads one such tensor;
  the lazy loader stacks them exactly as it does unquantized per-expert tensors.
- **MXFP4** (GPT-OSS): experts stay fused, ``...mlp.experts.{gate_up,down}_proj_{blocks,scales}``
  with experts on dim 0, biases ``..._bias`` beside them (:func:`read_mxfp4_experts`).

The dtype transformers dequantizes into is the parameter's dtype, i.e. the model dtype
(``config.dtype``, bfloat16 in the releases) except ``_keep_in_fp32_modules_strict`` (DeepSeek-V3:
the router ``gate.weight`` and ``e_score_correction_bias`` are float32), unless ``from_pretrained``
gets another ``dtype``. A loaded model no longer carries ``quantization_config``
(``HfQuantizer.postprocess_model`` removes it when it dequantized), so a writer must take it
from the source ``config.json``.

**Drop mode** copies kept experts' stored tensors unchanged: per-expert layouts are renumbered
(:func:`renumbered_expert_keys`), fused ones sliced on dim 0 (:func:`kept_expert_tensors`).
**Changed weights** are re-quantized in the source's scheme with a measured error
(:func:`quantized_tensors`); **pruned weights** are masked in the quantized domain with no error
at all (:func:`masked_tensors`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import torch

from grape.quant import fp8, mxfp4
from grape.quant.formats import FP8, MXFP4, QuantFormat, UnsupportedQuantizationError

__all__ = [
    "TensorSource",
    "kept_expert_tensors",
    "masked_tensors",
    "quantized_tensors",
    "read_mxfp4_experts",
    "read_parameter",
    "renumbered_expert_keys",
]

_SCALE_SUFFIX = "_scale_inv"
MXFP4_LEAVES = ("gate_up_proj", "down_proj")
_FUSED_EXPERT_SUFFIXES = ("_blocks", "_scales", "_bias", "")


class TensorSource(Protocol):
    """What grape reads checkpoints through (``grape.model_io.CheckpointIndex`` is one)."""

    def get(self, key: str) -> torch.Tensor: ...

    def __contains__(self, key: str) -> bool: ...


def read_parameter(source: TensorSource, key: str, fmt: QuantFormat, dtype: torch.dtype) -> torch.Tensor:
    """Checkpoint tensor ``key`` as a ``dtype`` tensor: an FP8 weight dequantized with its scale.

    A float tensor is cast; an integer one (buffers) is returned as stored. A quantized tensor
    without the companion its format needs is refused, never cast.
    """
    value = source.get(key)
    if fmt.method == FP8 and f"{key}{_SCALE_SUFFIX}" in source:
        return fp8.dequantize_fp8(value, source.get(f"{key}{_SCALE_SUFFIX}"), fmt.block_size, dtype)
    if value.dtype in (fp8.FP8_DTYPE, torch.float8_e5m2, torch.uint8, torch.int8):
        raise UnsupportedQuantizationError(f"tensor {key} is stored as {value.dtype} with no scale grape can apply")
    return value.to(dtype) if value.is_floating_point() else value


def read_mxfp4_experts(
    source: TensorSource, param_name: str, dtype: torch.dtype, experts: range | None = None
) -> torch.Tensor:
    """GPT-OSS experts parameter ``param_name`` (``...experts.gate_up_proj`` or ``.down_proj``) in ``dtype``.

    ``experts`` restricts it to a contiguous group (dim 0), so a layer can be dequantized a
    group at a time; when the source offers ``get_rows(key, start, stop)`` only those rows are read.
    """
    blocks = _rows(source, f"{param_name}_blocks", experts)
    scales = _rows(source, f"{param_name}_scales", experts)
    return mxfp4.gpt_oss_expert_weight(blocks, scales, dtype)


def _rows(source: TensorSource, key: str, experts: range | None) -> torch.Tensor:
    if experts is None:
        return source.get(key)
    get_rows = getattr(source, "get_rows", None)
    if get_rows is not None:
        return get_rows(key, experts.start, experts.stop)
    return source.get(key)[experts.start : experts.stop]


def renumbered_expert_keys(keys: Iterable[str], experts_prefix: str, kept: Sequence[int]) -> dict[str, str]:
    """Source key -> output key of every per-expert tensor of the kept experts, numbered 0..k-1.

    ``experts_prefix`` is e.g. ``model.layers.3.mlp.experts``; the ``j``-th kept expert's
    ``{prefix}.{kept[j]}.*`` tensors become ``{prefix}.{j}.*``. Dropped experts' keys are absent.
    """
    new_index = {int(old): new for new, old in enumerate(kept)}
    if len(new_index) != len(kept):
        raise ValueError(f"kept experts {list(kept)} repeat an index")
    pattern = re.compile(rf"^{re.escape(experts_prefix)}\.(\d+)\.(.+)$")
    mapping = {}
    for key in keys:
        match = pattern.match(key)
        if match is not None and int(match.group(1)) in new_index:
            mapping[key] = f"{experts_prefix}.{new_index[int(match.group(1))]}.{match.group(2)}"
    return mapping


def kept_expert_tensors(
    source: TensorSource, keys: Iterable[str], experts_prefix: str, kept: Sequence[int]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The stored tensors of the kept experts of one experts module, bytes and scales unchanged.

    Per-expert tensors (FP8 weights and their scales, or float ones) are renamed; fused tensors
    with experts on dim 0 (MXFP4 blocks/scales/biases, transformers' fused float experts) are
    sliced with ``index_select``. Routers are not experts tensors: the surgery slices them.
    """
    keys = list(keys)
    renamed = renumbered_expert_keys(keys, experts_prefix, kept)
    for old, new in sorted(renamed.items(), key=lambda item: item[1]):
        yield new, source.get(old)
    index = torch.tensor(list(kept), dtype=torch.long)
    for leaf in MXFP4_LEAVES:
        for suffix in _FUSED_EXPERT_SUFFIXES:
            key = f"{experts_prefix}.{leaf}{suffix}"
            if key in source:
                yield key, source.get(key).index_select(0, index)


def quantized_tensors(
    key: str, value: torch.Tensor, fmt: QuantFormat, *, scale_dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], float]:
    """The stored tensors of a changed weight in ``fmt``'s scheme, and the relative error it costs.

    ``key`` is the checkpoint name the weight was read from: an FP8 ``X.weight`` (2-D value) gives
    ``X.weight`` + ``X.weight_scale_inv`` (stored as ``scale_dtype``, the source's scale dtype);
    a GPT-OSS ``...experts.P`` (value in transformers' ``(E, cols, rows)`` layout) gives
    ``P_blocks`` + ``P_scales``. Call it only for tensors the source stores quantized.
    """
    if fmt.method == FP8:
        weight, scale_inv, error = fp8.requantize_fp8(value, fmt, scale_dtype=scale_dtype)
        return {key: weight, f"{key}{_SCALE_SUFFIX}": scale_inv}, error
    if fmt.method == MXFP4:
        blocks, scales, error = mxfp4.requantize_gpt_oss_expert_weight(value)
        return {f"{key}_blocks": blocks, f"{key}_scales": scales}, error
    raise ValueError(f"{key}: the source is not quantized, nothing to re-quantize")


def masked_tensors(source: TensorSource, key: str, keep: torch.Tensor, fmt: QuantFormat) -> dict[str, torch.Tensor]:
    """The stored tensors of weight ``key`` with the entries where ``keep`` is False pruned to exact zeros.

    ``keep`` has the shape of the parameter as grape reads it (FP8: the 2-D weight; MXFP4: the
    ``(E, cols, rows)`` GPT-OSS parameter). Scales are copied unchanged: every kept value reads
    back bit for bit as before, so sparsifying a quantized checkpoint costs no quantization error.
    """
    if fmt.method == FP8 and f"{key}{_SCALE_SUFFIX}" in source:
        scale_key = f"{key}{_SCALE_SUFFIX}"
        return {key: fp8.mask_fp8(source.get(key), keep), scale_key: source.get(scale_key)}
    if fmt.method == MXFP4 and f"{key}_blocks" in source:
        blocks = mxfp4.mask_mxfp4(source.get(f"{key}_blocks"), keep.transpose(-1, -2))
        return {f"{key}_blocks": blocks, f"{key}_scales": source.get(f"{key}_scales")}
    raise ValueError(f"{key} is not stored quantized; mask the float tensor instead")
