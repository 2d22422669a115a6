"""MXFP4 (OCP Microscaling, E2M1 values with one E8M0 exponent per 32): exact reading and writing.

**Layout** (GPT-OSS release, transformers 5.24 ``integrations/mxfp4.py``): a routed-expert
projection of ``rows x cols`` per expert is stored as ``P_blocks`` U8 ``(E, rows, cols/32, 16)``,
byte ``k`` of a block holding element ``2k`` in its low nibble and ``2k+1`` in its high nibble,
and ``P_scales`` U8 ``(E, rows, cols/32)``, the exponent byte ``b`` meaning ``2**(b - 127)``.
For ``gate_up_proj`` rows are ``2 * intermediate`` (gate and up interleaved, as GPT-OSS's
experts use them) and cols ``hidden``; for ``down_proj`` rows are ``hidden`` and cols
``intermediate``. transformers' ``GptOssExperts`` parameters are the transpose, ``(E, cols, rows)``
(``_convert_moe_packed_tensors`` l. 229-285 ends with ``transpose(1, 2)``).

**Dequantization** is ``float32(E2M1[nibble]) * 2**(b - 127)`` rounded once to the working dtype:
bit for bit what transformers computes (it looks the nibbles up in the target dtype and applies
``torch.ldexp``, l. 247-280; every E2M1 value is exact in any float dtype, so the single rounding
happens at the same place). Checked exhaustively for all 16 x 255 (value, exponent) pairs. The
exponent byte 255 is NaN in E8M0; transformers turns it into inf/0, grape refuses the tensor.

**Quantization.** transformers has no CPU path (``Mxfp4Quantize`` needs the Hub's Triton kernels,
``quantize_to_mxfp4`` l. 203-206), so grape implements the OCP MX v1.0 rule (section 6.3): per
block of 32, shared exponent ``floor(log2(amax)) - 2`` (2 = the largest E2M1 exponent), each
value divided by that power of two and rounded to the nearest E2M1 value, ties to even,
saturating at 6. Values exactly representable in a block come back unchanged; zeros are the exact
code 0, so :func:`mask_mxfp4` prunes weights with no quantization error. The rule clips: a block
whose largest magnitude lies just below ``4 * 2**k`` gets exponent ``k - 1`` and its largest value
saturates to ``3 * 2**k``. On fresh N(0, 1) blocks that still gives the lowest error (11.4 %
relative, against 11.9 % for the clip-free ``2**ceil(log2(amax / 6))``), but a tiny change to an
already-quantized block can cross that edge (about 4 % of blocks, whatever the size of the change),
one more reason the pipeline refuses distillation on MXFP4 sources.
"""

from __future__ import annotations

import torch

from grape.quant.formats import UnsupportedQuantizationError
from grape.quant.fp8 import relative_error

__all__ = [
    "BLOCK",
    "E2M1_VALUES",
    "dequantize_mxfp4",
    "gpt_oss_expert_weight",
    "mask_mxfp4",
    "quantize_gpt_oss_expert_weight",
    "quantize_mxfp4",
    "requantize_gpt_oss_expert_weight",
]

BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_E2M1_MAX_EXPONENT = 2
# Midpoints between consecutive E2M1 magnitudes; a value on one goes to the even code.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E8M0_NAN = 255
_CHUNK_ROWS = 1 << 16  # block rows (32 values each) dequantized at a time


def _exponents(scales: torch.Tensor) -> torch.Tensor:
    if scales.dtype != torch.uint8:
        raise UnsupportedQuantizationError(f"MXFP4 scales must be uint8 E8M0 bytes, got {scales.dtype}")
    if bool((scales == _E8M0_NAN).any()):
        raise UnsupportedQuantizationError("an MXFP4 scale byte is 255 (NaN in E8M0): the checkpoint is corrupt")
    return scales.to(torch.int32) - 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(..., rows, G, 16)`` blocks and ``(..., rows, G)`` scales as a ``(..., rows, 32 G)`` tensor of ``dtype``."""
    if blocks.dtype != torch.uint8 or blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise UnsupportedQuantizationError(
            f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} do not match scales {tuple(scales.shape)}"
        )
    exponents = _exponents(scales).reshape(-1)
    flat = blocks.reshape(-1, BLOCK // 2)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    out = torch.empty((flat.shape[0], BLOCK), dtype=dtype, device=blocks.device)
    for start in range(0, flat.shape[0], _CHUNK_ROWS):
        chunk = flat[start : start + _CHUNK_ROWS]
        values = torch.stack((table[(chunk & 0x0F).long()], table[(chunk >> 4).long()]), dim=-1).reshape(-1, BLOCK)
        out[start : start + _CHUNK_ROWS] = torch.ldexp(values, exponents[start : start + _CHUNK_ROWS, None]).to(dtype)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, scales)`` of a float tensor ``(..., K)``, K a multiple of 32, by the OCP MX rule."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 quantizes groups of {BLOCK} along the last dimension; it has {x.shape[-1]}")
    values = x.detach().to(torch.float32).contiguous().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("cannot quantize NaN or infinite values to MXFP4")
    amax = values.abs().amax(dim=-1)
    exponent = torch.frexp(amax)[1] - 1 - _E2M1_MAX_EXPONENT  # frexp: amax = m * 2**e with m in [0.5, 1)
    exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent)).clamp(-127, 127)
    scaled = torch.ldexp(values, -exponent[..., None])
    midpoints = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=x.device)
    magnitude = scaled.abs()
    code = torch.bucketize(magnitude, midpoints)  # a value on midpoint k gets code k ...
    on_midpoint = magnitude == midpoints[code.clamp(max=len(_MIDPOINTS) - 1)]
    code = code + (on_midpoint & (code % 2 == 1)).to(code.dtype)  # ... and moves up when k is odd
    code = code | (torch.signbit(scaled).to(code.dtype) << 3)
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)


def mask_mxfp4(blocks: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``blocks`` with the values where ``keep`` (``(..., rows, 32 G)``) is False set to code 0; scales stay valid."""
    expected = (*blocks.shape[:-2], blocks.shape[-2] * BLOCK)
    if tuple(keep.shape) != expected:
        raise ValueError(f"mask shape {tuple(keep.shape)} does not match MXFP4 blocks of {expected} values")
    keep = keep.to(torch.bool).reshape(*blocks.shape, 2)
    low = torch.where(keep[..., 0], blocks & 0x0F, 0)
    high = torch.where(keep[..., 1], blocks & 0xF0, 0)
    return (low | high).to(torch.uint8)


def gpt_oss_expert_weight(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A GPT-OSS experts parameter ``(E, cols, rows)`` as transformers holds it, from its blocks and scales."""
    return dequantize_mxfp4(blocks, scales, dtype).transpose(-1, -2).contiguous()


def quantize_gpt_oss_expert_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks and scales of a GPT-OSS experts parameter ``(E, cols, rows)`` (inverse of :func:`gpt_oss_expert_weight`)."""
    return quantize_mxfp4(weight.transpose(-1, -2))


def requantize_gpt_oss_expert_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Blocks, scales and the relative Frobenius error of the dequantized result against ``weight``."""
    blocks, scales = quantize_gpt_oss_expert_weight(weight)
    return blocks, scales, relative_error(weight, gpt_oss_expert_weight(blocks, scales, torch.float32))
