"""Format detection and refusal: what grape reads exactly, and everything it refuses by name."""

import json

import pytest
from quant_models import FP8_CONFIG, MXFP4_CONFIG, build_fp8_checkpoint, build_mxfp4_checkpoint

from grape.quant.formats import (
    FP8,
    MXFP4,
    NONE,
    TensorInfo,
    UnsupportedQuantizationError,
    check_tensors,
    detect_format,
    logical_parameters,
    tensor_infos,
)

DEEPSEEK_RELEASE = FP8_CONFIG | {"weight_block_size": [128, 128]}


def test_release_configs_are_detected():
    assert detect_format({"model_type": "qwen3_moe"}).method == NONE
    fp8 = detect_format({"model_type": "deepseek_v3", "quantization_config": DEEPSEEK_RELEASE})
    assert (fp8.method, fp8.block_size, fp8.scale_fmt) == (FP8, (128, 128), "float")
    assert dict(fp8.config) == DEEPSEEK_RELEASE  # written back unchanged
    v31 = detect_format({"model_type": "deepseek_v3", "quantization_config": DEEPSEEK_RELEASE | {"scale_fmt": "ue8m0"}})
    assert v31.scale_fmt == "ue8m0"
    mx = detect_format({"model_type": "gpt_oss", "quantization_config": MXFP4_CONFIG})
    assert mx.method == MXFP4 and mx.is_quantized


@pytest.mark.parametrize(
    "method", ["compressed-tensors", "gptq", "awq", "bitsandbytes", "fbgemm_fp8", "torchao", "hqq", "quark", "eetq"]
)
def test_other_methods_are_refused_by_name(method):
    with pytest.raises(UnsupportedQuantizationError, match=f"'{method}' is not supported.*block-scaled FP8.*MXFP4"):
        detect_format({"model_type": "llama", "quantization_config": {"quant_method": method, "bits": 4}})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight_block_size": None}, "per-tensor FP8"),
        ({"activation_scheme": "static"}, "activation_scheme 'static'"),
        ({"fmt": "e5m2"}, "format 'e5m2'"),
        ({"expert_dtype": "fp4"}, "FP4-packed experts"),
        ({"modules_to_convert": ["embed_tokens"]}, "quantized embeddings"),
        ({"scale_fmt": "e4m3"}, "scale_fmt 'e4m3'"),
        ({"weight_block_size": [128]}, "two positive integers"),
        ({"kv_cache_scheme": {"num_bits": 8}}, r"\['kv_cache_scheme'\] are not understood"),
    ],
)
def test_fp8_variants_grape_cannot_read_exactly_are_refused(change, message):
    with pytest.raises(UnsupportedQuantizationError, match=message):
        detect_format({"model_type": "deepseek_v3", "quantization_config": DEEPSEEK_RELEASE | change})


def test_mxfp4_only_for_gpt_oss_and_known_keys():
    with pytest.raises(UnsupportedQuantizationError, match="GPT-OSS only.*'mixtral'"):
        detect_format({"model_type": "mixtral", "quantization_config": MXFP4_CONFIG})
    with pytest.raises(UnsupportedQuantizationError, match="not understood"):
        detect_format({"model_type": "gpt_oss", "quantization_config": MXFP4_CONFIG | {"group_size": 32}})


def test_transformers_config_objects_are_read(tmp_path):
    from transformers import AutoConfig

    directory = build_fp8_checkpoint("qwen3_moe", tmp_path / "q")
    fmt = detect_format(AutoConfig.from_pretrained(directory))
    assert fmt.method == FP8 and fmt.block_size == (16, 16)


def test_release_checkpoints_pass_the_tensor_check(tmp_path):
    for directory, method in (
        (build_fp8_checkpoint("deepseek_v3", tmp_path / "ds"), FP8),
        (build_mxfp4_checkpoint(tmp_path / "oss"), MXFP4),
    ):
        fmt = detect_format(json.loads((directory / "config.json").read_text()))
        infos = tensor_infos(directory)
        assert fmt.method == method
        check_tensors(fmt, infos)  # does not raise
        assert any(info.dtype in ("F8_E4M3", "U8") for info in infos.values())


FP8_FMT = detect_format({"quantization_config": FP8_CONFIG | {"weight_block_size": [128, 128]}})
GOOD_FP8 = {
    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": TensorInfo("F8_E4M3", (576, 7168)),
    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv": TensorInfo("F32", (5, 56)),
    "model.layers.0.mlp.gate.weight": TensorInfo("BF16", (256, 7168)),
    "model.layers.0.mlp.gate.e_score_correction_bias": TensorInfo("F32", (256,)),
}


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"a.weight": TensorInfo("F8_E4M3", (128, 128))}, "a.weight has no weight_scale_inv"),
        ({"a.weight": TensorInfo("BF16", (128, 128)), "a.weight_scale_inv": TensorInfo("F32", (1, 1))}, "no F8_E4M3 weight"),
        ({"a.weight": TensorInfo("F8_E4M3", (576, 7168)), "a.weight_scale_inv": TensorInfo("F32", (4, 56))}, r"not \(5, 56\)"),
        ({"a.weight": TensorInfo("F8_E4M3", (8, 8)), "a.weight_scale_inv": TensorInfo("U8", (1, 1))}, "scale_fmt 'float' stores"),
        ({"a.weight": TensorInfo("F8_E5M2", (8, 8))}, "F8_E5M2, which a block-scaled FP8"),
        ({"a.input_scale": TensorInfo("F32", ())}, "static activation scale"),
        ({"a.qweight": TensorInfo("I8", (8, 8))}, "I8"),
    ],
)
def test_fp8_tensors_that_contradict_the_declaration_are_refused(tensors, message):
    check_tensors(FP8_FMT, GOOD_FP8)
    with pytest.raises(UnsupportedQuantizationError, match=message):
        check_tensors(FP8_FMT, GOOD_FP8 | tensors)


def test_quantized_tensors_without_a_declaration_are_refused():
    plain = detect_format({"model_type": "qwen3_moe"})
    check_tensors(plain, {"a.weight": TensorInfo("BF16", (4, 4)), "pos": TensorInfo("I64", (4,))})
    for dtype in ("F8_E4M3", "U8", "F8_E5M2", "F4"):
        with pytest.raises(UnsupportedQuantizationError, match=f"{dtype} but config.json declares no quantization_config"):
            check_tensors(plain, {"a.weight": TensorInfo(dtype, (4, 4))})


def test_mxfp4_tensors_are_checked():
    fmt = detect_format({"model_type": "gpt_oss", "quantization_config": MXFP4_CONFIG})
    prefix = "model.layers.0.mlp.experts.down_proj"
    good = {f"{prefix}_blocks": TensorInfo("U8", (4, 64, 1, 16)), f"{prefix}_scales": TensorInfo("U8", (4, 64, 1))}
    check_tensors(fmt, good)
    for bad, message in (
        ({f"{prefix}_scales": TensorInfo("U8", (4, 64, 2))}, "no scales of shape"),
        ({f"{prefix}_blocks": TensorInfo("U8", (4, 64, 1, 8))}, "not \\(experts, rows, cols/32, 16\\)"),
        ({"model.layers.0.self_attn.q_proj.weight": TensorInfo("F8_E4M3", (4, 4))}, "F8_E4M3, which an MXFP4"),
        ({f"{prefix}_blocks": TensorInfo("I8", (4, 64, 1, 16))}, "not U8"),
    ):
        with pytest.raises(UnsupportedQuantizationError, match=message):
            check_tensors(fmt, good | bad)
    with pytest.raises(UnsupportedQuantizationError, match="no blocks beside them"):
        check_tensors(fmt, {f"{prefix}_scales": TensorInfo("U8", (4, 64, 1))})


def test_logical_parameters_count_values_not_bytes():
    assert logical_parameters("a.weight", TensorInfo("F8_E4M3", (576, 7168)), FP8_FMT) == 576 * 7168
    assert logical_parameters("a.weight_scale_inv", TensorInfo("F32", (5, 56)), FP8_FMT) == 0
    mx = detect_format({"model_type": "gpt_oss", "quantization_config": MXFP4_CONFIG})
    blocks = TensorInfo("U8", (32, 5760, 90, 16))
    assert logical_parameters("model.layers.0.mlp.experts.gate_up_proj_blocks", blocks, mx) == 32 * 5760 * 2880
    assert logical_parameters("model.layers.0.mlp.experts.gate_up_proj_scales", TensorInfo("U8", (32, 5760, 90)), mx) == 0
    assert logical_parameters("model.layers.0.mlp.experts.gate_up_proj_bias", TensorInfo("BF16", (32, 5760)), mx) == 32 * 5760
