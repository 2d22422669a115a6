"""Block-scaled FP8: dequantization bit for bit as transformers (and as the release spec where they differ), quantization as Fp8Quantize."""

from types import SimpleNamespace

import pytest
import torch
from quant_models import reference_fp8_block_quantize

from grape.quant.formats import QuantFormat, UnsupportedQuantizationError
from grape.quant.fp8 import (
    FP8_DTYPE,
    decode_scales,
    dequantize_fp8,
    mask_fp8,
    quantize_fp8,
    relative_error,
    requantize_fp8,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _random_fp8(shape, generator) -> torch.Tensor:
    """Every E4M3 code but NaN (0x7f, 0xff), subnormals and both zeros included."""
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return codes.masked_fill((codes & 0x7F) == 0x7F, 0x55).view(FP8_DTYPE)


def _transformers_dequantize(weight, scale, dtype):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=dtype)


def _spec_dequantize(weight, scale, block, dtype):
    """The release's definition in float64: element (r, c) times scale[r // bm, c // bn]."""
    rows, cols = weight.shape
    grid = decode_scales(scale).double()
    full = grid.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.double() * full).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("shape", "block"), [((256, 384), (128, 128)), ((48, 32), (16, 16)), ((24, 40), (128, 128))])
def test_dequantize_equals_transformers_bit_for_bit(shape, block, dtype):
    generator = torch.Generator().manual_seed(1)
    weight = _random_fp8(shape, generator)
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    scale = torch.rand(grid, generator=generator) * 1e-2 + 1e-5
    ours = dequantize_fp8(weight, scale, block, dtype)
    assert ours.dtype == dtype
    assert torch.equal(_bits(ours), _bits(_transformers_dequantize(weight, scale, dtype)))


def test_ue8m0_byte_scales_equal_transformers():
    generator = torch.Generator().manual_seed(2)
    weight = _random_fp8((64, 48), generator)
    scale = torch.randint(0, 255, (4, 3), dtype=torch.uint8, generator=generator)
    ours = dequantize_fp8(weight, scale, (16, 16), torch.float32)
    assert torch.equal(_bits(ours), _bits(_transformers_dequantize(weight, scale, torch.float32)))
    assert torch.equal(decode_scales(scale.view(torch.float8_e8m0fnu)), decode_scales(scale))
    with pytest.raises(UnsupportedQuantizationError, match="255"):
        decode_scales(torch.full((1, 1), 255, dtype=torch.uint8))


def test_partial_edge_blocks_follow_the_release_definition():
    """DeepSeek-V3's kv_a_proj_with_mqa: 576 rows, 128-blocks, a 5-row scale grid whose last block has 64 rows."""
    generator = torch.Generator().manual_seed(3)
    weight = _random_fp8((576, 200), generator)
    scale = torch.rand((5, 2), generator=generator) + 0.5
    ours = dequantize_fp8(weight, scale, (128, 128), torch.float32)
    assert torch.equal(ours, _spec_dequantize(weight, scale, (128, 128), torch.float32))
    assert torch.equal(ours[512:, 128:], (weight[512:, 128:].float() * scale[4, 1]))


def test_mismatched_scale_grid_is_refused():
    weight = torch.zeros(576, 128).to(FP8_DTYPE)
    with pytest.raises(UnsupportedQuantizationError, match=r"not \(5, 1\)"):
        dequantize_fp8(weight, torch.ones(4, 1), (128, 128), torch.bfloat16)
    with pytest.raises(UnsupportedQuantizationError, match="float8_e4m3fn"):
        dequantize_fp8(torch.zeros(4, 4), torch.ones(1, 1), (128, 128), torch.bfloat16)


def _transformers_quantize(x, block, scale_fmt):
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    config = FineGrainedFP8Config(weight_block_size=block, scale_fmt=scale_fmt)
    out = Fp8Quantize(SimpleNamespace(quantization_config=config))._quantize_one("w.weight", x)
    return out["w.weight"], out["w.weight_scale_inv"]


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_quantize_equals_transformers_fp8quantize(scale_fmt):
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    x[:16, :32] = 0  # an all-zero block keeps scale 1
    ref_weight, ref_scale = _transformers_quantize(x, (16, 32), scale_fmt)
    weight, scale = quantize_fp8(x, (16, 32), scale_fmt=scale_fmt)
    assert torch.equal(weight.view(torch.uint8), ref_weight.view(torch.uint8))
    assert torch.equal(scale, ref_scale.to(torch.float32))
    if scale_fmt == "ue8m0":  # the same values whichever way the exponents are stored
        as_bytes = quantize_fp8(x, (16, 32), scale_fmt=scale_fmt, scale_dtype=torch.uint8)
        assert as_bytes[1].dtype == torch.uint8 and torch.equal(decode_scales(as_bytes[1]), scale)
        assert torch.equal(as_bytes[0].view(torch.uint8), weight.view(torch.uint8))


def test_quantize_handles_partial_blocks_like_the_release():
    x = torch.randn(576, 200, generator=torch.Generator().manual_seed(5))
    weight, scale = quantize_fp8(x, (128, 128))
    ref_weight, ref_scale = reference_fp8_block_quantize(x, (128, 128))
    assert scale.shape == (5, 2)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    # values may differ by one FP8 step where the two scales round differently; they read back alike
    torch.testing.assert_close(
        dequantize_fp8(weight, scale, (128, 128), torch.float64), _spec_dequantize(ref_weight, ref_scale, (128, 128), torch.float64),
        rtol=0.07, atol=1e-6,
    )


def test_bfloat16_scale_storage_dequantizes_with_the_stored_scale():
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(6))
    weight, scale = quantize_fp8(x, (16, 16), scale_dtype=torch.bfloat16)
    assert scale.dtype == torch.bfloat16
    assert relative_error(x, dequantize_fp8(weight, scale, (16, 16), torch.float32)) < 0.05


def test_requantize_reports_the_error_and_is_exact_on_fp8_values():
    fmt = QuantFormat(method="fp8", block_size=(16, 16))
    x = torch.randn(48, 64, generator=torch.Generator().manual_seed(7))
    weight, scale, error = requantize_fp8(x, fmt)
    assert error == pytest.approx(relative_error(x, dequantize_fp8(weight, scale, (16, 16), torch.float32)))
    assert 0.005 < error < 0.05  # E4M3 keeps 3 mantissa bits
    # a block whose values are FP8 codes times a power of two with amax 448 comes back exactly
    codes = _random_fp8((16, 16), torch.Generator().manual_seed(8)).float()
    codes[0, 0] = 448.0
    exact = codes * 2.0**-9
    w2, s2, error2 = requantize_fp8(exact, fmt)
    assert error2 == 0.0 and torch.equal(w2.float(), codes)


def test_masking_fp8_codes_prunes_without_error():
    generator = torch.Generator().manual_seed(9)
    weight = _random_fp8((32, 48), generator)
    scale = torch.rand((2, 3), generator=generator)
    keep = torch.rand((32, 48), generator=generator) > 0.5
    masked = mask_fp8(weight, keep)
    dense = dequantize_fp8(weight, scale, (16, 16), torch.float32)
    assert torch.equal(dequantize_fp8(masked, scale, (16, 16), torch.float32), torch.where(keep, dense, 0.0))
