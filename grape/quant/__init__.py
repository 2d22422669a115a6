"""Quantized release formats (block-scaled FP8, MXFP4): detection, exact reading, raw copy, re-quantization."""
