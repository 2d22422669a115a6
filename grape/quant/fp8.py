"""Block-scaled FP8 (E4M3 values, one scale per block): exact dequantization and re-quantization.

**Dequantization.** Element ``(r, c)`` of a weight is ``float32(q[r, c]) * float32(s[r // bm, c // bn])``
rounded once to the working dtype, where ``s`` is ``weight_scale_inv`` and ``(bm, bn)`` the
config's ``weight_block_size``; an edge block that is cut short by the weight's shape uses its
scale for the rows/columns it has (the DeepSeek-V3 release notes: partial blocks are zero-padded
to compute their scale, the padding is dropped after).

That is bit for bit what transformers 5.24 computes on CPU (``Fp8Dequantize._dequantize_one``,
``integrations/finegrained_fp8.py`` l. 1130-1173: fp32 product, one cast to the target
parameter's dtype) for every weight whose rows and columns are each a multiple of the block
size or fit in one block. For other shapes transformers derives the block from the scale grid
(``rows // scale_rows``, l. 1149-1154) instead of the config: when the grid does not divide the
shape it raises ("Weight shape (576, 7168) not divisible by scale grid (5, 56)": DeepSeek-V3's
``kv_a_proj_with_mqa`` has 576 rows, so transformers 5.24 cannot load the DeepSeek-V3/R1
releases on CPU at all), and when it does divide (e.g. 24 rows, block 16: grid 2, "block" 12) it
applies the scales to the wrong rows without a word. grape follows the release's definition
there, which is also what serving engines apply.

**Quantization** (for weights grape changes: merge, distill) is transformers' ``Fp8Quantize``
(l. 1040-1078) for shapes it accepts, bit for bit: per block ``scale = 448 / amax`` (1 for an
all-zero block), ``weight_scale_inv = 1 / scale``, values ``clamp(x * scale, -448, 448)`` cast to
E4M3 with round-to-nearest-even; with ``scale_fmt: ue8m0`` the inverse scale is first rounded
up to a power of two and the values are divided by exactly that. Partial edge blocks take the
amax of the elements they have (transformers leaves such weights unquantized instead).

**Sparsity survives exactly.** Zeroing FP8 codes keeps every other value and its block scale,
so :func:`mask_fp8` writes a pruned weight with no quantization error at all.
"""

from __future__ import annotations

import torch

from grape.quant.formats import QuantFormat, UnsupportedQuantizationError, scale_grid

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "decode_scales",
    "dequantize_fp8",
    "encode_scales",
    "mask_fp8",
    "quantize_fp8",
    "relative_error",
    "requantize_fp8",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_E8M0_NAN = 255
_CHUNK_ELEMENTS = 1 << 22  # rows are dequantized in chunks of about this many elements


def decode_scales(scale_inv: torch.Tensor) -> torch.Tensor:
    """``weight_scale_inv`` as float32: float storage as is, E8M0 (U8 bytes or float8_e8m0fnu) as ``2**(b-127)``."""
    if scale_inv.dtype == torch.uint8:
        if bool((scale_inv == _E8M0_NAN).any()):
            raise UnsupportedQuantizationError("an E8M0 scale byte is 255 (NaN): the checkpoint is corrupt")
        return torch.ldexp(torch.ones(scale_inv.shape, dtype=torch.float32), scale_inv.to(torch.int32) - 127)
    return scale_inv.to(torch.float32)


def encode_scales(inverse: torch.Tensor, like: torch.dtype) -> torch.Tensor:
    """Float32 inverse scales stored as ``like`` (the dtype the source checkpoint uses for them)."""
    if like == torch.uint8:
        exponent = torch.frexp(inverse)[1] - 1  # exact: the scales are powers of two here
        return (exponent + 127).clamp(0, 254).to(torch.uint8)
    return inverse.to(like)


def _check_pair(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int]) -> None:
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise UnsupportedQuantizationError(f"expected a 2-D float8_e4m3fn weight, got {weight.dtype} {tuple(weight.shape)}")
    expected = scale_grid(tuple(weight.shape), block_size)
    if tuple(scale_inv.shape) != expected:
        raise UnsupportedQuantizationError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, not {expected} for a {tuple(weight.shape)} weight in {block_size} blocks"
        )


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The float weight an FP8 ``weight`` + ``weight_scale_inv`` pair stands for, in ``dtype``.

    Works a chunk of row blocks at a time, so the float32 transient is a few MB whatever the
    weight's size.
    """
    _check_pair(weight, scale_inv, block_size)
    rows, cols = weight.shape
    block_rows, block_cols = block_size
    column_scales = decode_scales(scale_inv).repeat_interleave(block_cols, dim=1)[:, :cols]
    out = torch.empty((rows, cols), dtype=dtype, device=weight.device)
    blocks_per_chunk = max(1, _CHUNK_ELEMENTS // (block_rows * max(cols, 1)))
    for first in range(0, column_scales.shape[0], blocks_per_chunk):
        last = min(first + blocks_per_chunk, column_scales.shape[0])
        start, stop = first * block_rows, min(last * block_rows, rows)
        scales = column_scales[first:last].repeat_interleave(block_rows, dim=0)[: stop - start]
        out[start:stop] = (weight[start:stop].to(torch.float32) * scales.to(weight.device)).to(dtype)
    return out


def quantize_fp8(
    x: torch.Tensor, block_size: tuple[int, int], *, scale_fmt: str = "float", scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, weight_scale_inv)`` of a 2-D float tensor, as transformers' ``Fp8Quantize`` makes them.

    ``scale_dtype`` is how the source checkpoint stores its scales (float32, bfloat16, or for
    ``ue8m0`` uint8 bytes / float8_e8m0fnu); the values are quantized with exactly the stored
    scale, so dequantization inverts them as closely as FP8 allows.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8 takes a 2-D weight, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    block_rows, block_cols = block_size
    grid_rows, grid_cols = scale_grid((rows, cols), block_size)
    x32 = x.detach().to(torch.float32)
    padded = torch.zeros((grid_rows * block_rows, grid_cols * block_cols), dtype=torch.float32, device=x.device)
    padded[:rows, :cols] = x32
    tiles = padded.view(grid_rows, block_rows, grid_cols, block_cols)
    amax = tiles.abs().amax(dim=(1, 3))
    nonzero = amax > 0
    scale = torch.where(nonzero, FP8_MAX / torch.where(nonzero, amax, torch.ones_like(amax)), torch.ones_like(amax))
    inverse = (1.0 / scale).to(torch.float32)
    if scale_fmt == "ue8m0":
        tiny = torch.finfo(torch.float32).tiny
        inverse = torch.pow(2.0, torch.ceil(torch.log2(inverse.clamp(min=tiny))))
    stored = encode_scales(inverse, scale_dtype)
    used = decode_scales(stored)
    if scale_fmt == "ue8m0" or not torch.equal(used, inverse):
        scale = 1.0 / used  # divide by exactly the scale that dequantization multiplies by
    values = (tiles * scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    weight = values.view(grid_rows * block_rows, grid_cols * block_cols)[:rows, :cols].contiguous()
    return weight, stored


def mask_fp8(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``weight`` with the codes where ``keep`` is False set to +0; the scales stay valid unchanged."""
    if weight.dtype != FP8_DTYPE or keep.shape != weight.shape:
        raise ValueError(f"mask_fp8 needs a float8_e4m3fn weight and a mask of its shape, got {weight.dtype} {tuple(keep.shape)}")
    return weight.view(torch.uint8).masked_fill(~keep.to(torch.bool), 0).view(FP8_DTYPE)


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """``||reference - approximation||_F / ||reference||_F`` in float64 (0 for two zero tensors)."""
    reference = reference.detach().to(torch.float64)
    difference = torch.linalg.vector_norm(reference - approximation.detach().to(torch.float64)).item()
    norm = torch.linalg.vector_norm(reference).item()
    if norm == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / norm


def requantize_fp8(
    x: torch.Tensor, fmt: QuantFormat, *, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Quantize a changed weight in ``fmt``'s scheme and measure the error it costs.

    Returns ``(weight, weight_scale_inv, error)`` with ``error`` the relative Frobenius error of
    the dequantized result against ``x``, for the pipeline's report.
    """
    weight, scale_inv = quantize_fp8(x, fmt.block_size, scale_fmt=fmt.scale_fmt, scale_dtype=scale_dtype)
    error = relative_error(x, dequantize_fp8(weight, scale_inv, fmt.block_size, torch.float32))
    return weight, scale_inv, error
