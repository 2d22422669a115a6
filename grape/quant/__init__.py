"""Quantized release formats, read exactly and written back in the same format.

grape prunes the models as they are released: DeepSeek-V3/R1 and Qwen3-*-FP8 in block-scaled
FP8, GPT-OSS in MXFP4. This package is everything format-specific, in small modules:

- :mod:`~grape.quant.formats`: what ``config.json`` declares (:func:`~grape.quant.formats.detect_format`),
  whether the safetensors headers agree (:func:`~grape.quant.formats.check_tensors`), and the
  refusal of every other format by name (:class:`~grape.quant.formats.UnsupportedQuantizationError`,
  raised before any weight is read). Also true parameter counts of packed tensors.
- :mod:`~grape.quant.fp8` and :mod:`~grape.quant.mxfp4`: dequantization bit for bit as
  transformers 5.24 does it, quantization for changed weights, exact masking for pruned ones.
- :mod:`~grape.quant.layout`: checkpoint names, i.e. reading a parameter as transformers fuses
  it, copying kept experts' bytes unchanged (drop mode), and the stored tensors of a
  re-quantized or masked weight.
- :mod:`~grape.quant.mtp`: DeepSeek's multi-token-prediction layer and grape's rule for it.

What the pipeline does with a quantized source, and why (measured by
``benchmarks/quant_requant_error.py`` on release-size experts):

- **drop**: kept experts' quantized bytes and scales are copied unchanged; no error.
- **merge**: the merged expert is re-quantized in the source's scheme and the relative error
  is reported. It equals the error the source's own quantization has (FP8 2.6 %, MXFP4 11.5 %
  for N(0, 0.02) weights), so merging does not make the checkpoint less exact than it was.
- **sparsify**: pruned values are set to the exact zero code and the scales kept
  (:func:`~grape.quant.layout.masked_tensors`); every kept value reads back bit for bit, error 0.
  (Dequantizing, masking and re-quantizing instead costs 1.5 % on FP8 for 50 % unstructured
  sparsity, because removing a block's largest value changes its scale.)
- **distill**: refuse on a quantized source. A distillation update is far below the format's
  resolution: FP8 keeps 4 % of an update of relative size 1e-3 and 36 % of one of 1e-2 (the
  rounding error is as large as the update itself), MXFP4 changes a weight by 3x-26x the size of
  the update, so the student written back would not be the student that was trained.
"""
