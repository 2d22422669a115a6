"""What re-quantization costs, for the three ways grape changes expert weights on a quantized source.

For one expert projection of release size (2048 x 7168, weights ~N(0, 0.02)) already stored in
the format (FP8 blocks of 128 x 128, or MXFP4), it measures:

- **merge**: the frequency-weighted average of two experts, re-quantized: relative Frobenius
  error against the unquantized average (and, for scale, the error the source's own
  quantization has);
- **sparsify** (50 % unstructured, 2:4): the pruned weight written by masking codes in the
  quantized domain (``layout.masked_tensors``) against the same mask applied in float, and the
  alternative "dequantize, mask, re-quantize";
- **distill**: a small update ``delta`` (relative size 1e-3 and 1e-2) added to the dequantized
  weight and re-quantized: how much of ``delta`` survives, ``<q(w + delta) - w, delta> / |delta|^2``,
  and the re-quantization error measured against the update, ``|q(w + delta) - (w + delta)| / |delta|``.

Prints a markdown table. Example::

    python benchmarks/quant_requant_error.py
"""

from __future__ import annotations

import torch

from grape.quant import fp8, mxfp4
from grape.quant.formats import FP8, QuantFormat
from grape.quant.fp8 import relative_error

SHAPE = (2048, 7168)
FORMAT = QuantFormat(method=FP8, block_size=(128, 128))


def _fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    weight, scale = fp8.quantize_fp8(x, FORMAT.block_size)
    return fp8.dequantize_fp8(weight, scale, FORMAT.block_size, torch.float32)


def _mxfp4_round_trip(x: torch.Tensor) -> torch.Tensor:
    return mxfp4.dequantize_mxfp4(*mxfp4.quantize_mxfp4(x), torch.float32)


def _masked_in_codes(name: str, codes: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """The pruned weight as read back after masking the stored codes (no re-quantization)."""
    if name == "FP8":
        return fp8.dequantize_fp8(fp8.mask_fp8(codes[0], keep), codes[1], FORMAT.block_size, torch.float32)
    return mxfp4.dequantize_mxfp4(mxfp4.mask_mxfp4(codes[0], keep), codes[1], torch.float32)


def _survival(round_trip, stored: torch.Tensor, delta: torch.Tensor) -> float:
    moved = round_trip(stored + delta) - stored
    return float((moved * delta).sum() / (delta * delta).sum())


def measure(seed: int = 0) -> list[tuple[str, str, float]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    quantizers = {"FP8": lambda x: fp8.quantize_fp8(x, FORMAT.block_size), "MXFP4": mxfp4.quantize_mxfp4}
    for name, round_trip in (("FP8", _fp8_round_trip), ("MXFP4", _mxfp4_round_trip)):
        original = torch.randn(SHAPE, generator=generator) * 0.02
        codes = quantizers[name](original)  # the source checkpoint's stored tensors
        stored = round_trip(original)  # and the values they read back as
        rows.append((name, "source quantization (for scale)", relative_error(original, stored)))
        other = round_trip(torch.randn(SHAPE, generator=generator) * 0.02)
        merged = 0.7 * stored + 0.3 * other
        rows.append((name, "merge: re-quantized average", relative_error(merged, round_trip(merged))))
        for label, keep in (
            ("50% unstructured", torch.rand(SHAPE, generator=generator) > 0.5),
            ("2:4", _two_of_four(stored)),
        ):
            reference = torch.where(keep, stored, 0.0)
            rows.append((name, f"sparsify {label}: codes masked", relative_error(reference, _masked_in_codes(name, codes, keep))))
            rows.append((name, f"sparsify {label}: dequantize-mask-requantize", relative_error(reference, round_trip(reference))))
        for size in (1e-3, 1e-2):
            delta = torch.randn(SHAPE, generator=generator) * (0.02 * size)
            rows.append((name, f"distill: fraction of a {size:g} update kept", _survival(round_trip, stored, delta)))
            error = torch.linalg.vector_norm(round_trip(stored + delta) - (stored + delta)) / torch.linalg.vector_norm(delta)
            rows.append((name, f"distill: re-quantization error / update, {size:g} update", float(error)))
    return rows


def _two_of_four(weight: torch.Tensor) -> torch.Tensor:
    groups = weight.abs().reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(weight.shape)


def main() -> int:
    print("| format | measurement | value |\n|---|---|---|")
    for name, label, value in measure():
        print(f"| {name} | {label} | {value:.4g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
