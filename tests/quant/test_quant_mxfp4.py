"""MXFP4: dequantization bit for bit as transformers on every code/exponent, OCP quantization against a brute-force reference."""

import math

import pytest
import torch

from grape.quant.formats import UnsupportedQuantizationError
from grape.quant.mxfp4 import (
    E2M1_VALUES,
    dequantize_mxfp4,
    gpt_oss_expert_weight,
    mask_mxfp4,
    quantize_gpt_oss_expert_weight,
    quantize_mxfp4,
    requantize_gpt_oss_expert_weight,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_code_and_exponent_equals_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    exponents = 255  # byte 255 is NaN in E8M0 and refused (below)
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    blocks = every_byte.repeat(exponents, 1).reshape(1, exponents * 16, 1, 16)
    scales = torch.arange(exponents, dtype=torch.uint8).repeat_interleave(16).reshape(1, exponents * 16, 1)
    ours = gpt_oss_expert_weight(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.shape == theirs.shape == (1, 32, exponents * 16)
    assert torch.equal(_bits(ours), _bits(theirs))


def test_release_shapes_and_refusals():
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 64, 2, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(100, 140, (3, 64, 2), dtype=torch.uint8, generator=generator)
    assert gpt_oss_expert_weight(blocks, scales, torch.bfloat16).shape == (3, 64, 64)
    with pytest.raises(UnsupportedQuantizationError, match="NaN"):
        dequantize_mxfp4(blocks, scales.fill_(255), torch.bfloat16)
    with pytest.raises(UnsupportedQuantizationError, match="do not match"):
        dequantize_mxfp4(blocks, scales[..., :1], torch.bfloat16)


def _reference_quantize(block: list[float]) -> tuple[int, list[float]]:
    """OCP MX v1.0 in Python floats: exponent floor(log2 amax) - 2, nearest E2M1 value, ties to the even code."""
    amax = max(abs(v) for v in block)
    exponent = 0 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1 - 2))
    scale = 2.0**exponent
    out = []
    for v in block:
        magnitude = min(abs(v) / scale, 6.0)
        best = min(range(8), key=lambda code: (abs(E2M1_VALUES[code] - magnitude), code % 2))
        out.append(math.copysign(E2M1_VALUES[best] * scale, v))
    return exponent, out


def test_quantize_matches_a_brute_force_ocp_reference():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 64, generator=generator) * torch.logspace(-3, 2, 6)[:, None]
    x[0, :32] = 0.0
    x[1, :32] = torch.tensor(E2M1_VALUES * 2) * 0.25 + 0.0625  # many exact midpoints: ties to even
    blocks, scales = quantize_mxfp4(x)
    values = dequantize_mxfp4(blocks, scales, torch.float64)
    for row in range(x.shape[0]):
        for group in range(2):
            exponent, expected = _reference_quantize(x[row, 32 * group : 32 * (group + 1)].tolist())
            assert int(scales[row, group]) - 127 == exponent
            assert values[row, 32 * group : 32 * (group + 1)].tolist() == expected


def test_exactly_representable_values_round_trip_bit_for_bit():
    generator = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 256, (4, 8, 3, 16), dtype=torch.uint8, generator=generator)
    codes[..., 0] = (codes[..., 0] & 0xF0) | 0x07  # every block holds a 6.0: its exponent is the one stored
    exponents = torch.randint(100, 150, (4, 8, 3), dtype=torch.uint8, generator=generator)
    values = dequantize_mxfp4(codes, exponents, torch.float32)
    blocks, scales = quantize_mxfp4(values)
    assert torch.equal(scales, exponents)
    assert torch.equal(blocks, codes)  # -0.0 keeps its sign bit too


def test_dequantized_error_is_bounded_by_half_a_grid_step_and_saturation():
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    blocks, scales = quantize_mxfp4(x)
    error = (dequantize_mxfp4(blocks, scales, torch.float32) - x).abs()
    scale = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - 127).repeat_interleave(32, dim=-1)
    magnitude = x.abs() / scale
    half_step = torch.where(magnitude < 2, 0.25, torch.where(magnitude < 4, 0.5, 1.0))
    bound = torch.where(magnitude <= 6, half_step, magnitude - 6) * scale
    assert bool((error <= bound * (1 + 1e-6)).all())


def test_gpt_oss_layout_round_trip_and_requantize_error():
    weight = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(4)) * 0.02  # (E, cols, rows)
    blocks, scales = quantize_gpt_oss_expert_weight(weight)
    assert blocks.shape == (2, 32, 2, 16) and scales.shape == (2, 32, 2)
    _, _, error = requantize_gpt_oss_expert_weight(weight)
    assert 0.05 < error < 0.2  # E2M1 keeps one mantissa bit
    again = gpt_oss_expert_weight(blocks, scales, torch.float32)
    assert torch.equal(gpt_oss_expert_weight(*quantize_gpt_oss_expert_weight(again), torch.float32), again)


def test_masking_codes_prunes_without_error():
    generator = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (2, 8, 2, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(110, 130, (2, 8, 2), dtype=torch.uint8, generator=generator)
    keep = torch.rand((2, 8, 64), generator=generator) > 0.5
    dense = dequantize_mxfp4(blocks, scales, torch.float32)
    masked = dequantize_mxfp4(mask_mxfp4(blocks, keep), scales, torch.float32)
    assert torch.equal(masked, torch.where(keep, dense, 0.0))
