"""Layout helpers: expert renumbering, group-wise MXFP4 reads, re-quantized and masked tensors under their checkpoint names, MTP rules."""

from types import SimpleNamespace

import pytest
import torch

from grape.quant.formats import FP8, MXFP4, QuantFormat, UnsupportedQuantizationError
from grape.quant.fp8 import FP8_DTYPE, dequantize_fp8
from grape.quant.layout import (
    kept_expert_tensors,
    masked_tensors,
    quantized_tensors,
    read_mxfp4_experts,
    read_parameter,
    renumbered_expert_keys,
)
from grape.quant.mtp import is_mtp_tensor, mtp_layer_indices, scalar_expert_count
from grape.quant.mxfp4 import gpt_oss_expert_weight

FP8_FMT = QuantFormat(method=FP8, block_size=(16, 16))
MX_FMT = QuantFormat(method=MXFP4)
PREFIX = "model.layers.2.mlp.experts"


def test_renumbering_keeps_only_kept_experts_in_order():
    keys = [f"{PREFIX}.{j}.{p}.{s}" for j in range(12) for p in ("gate_proj", "down_proj") for s in ("weight", "weight_scale_inv")]
    keys += ["model.layers.2.mlp.gate.weight", "model.layers.2.mlp.experts_extra.3.weight", f"{PREFIX}.10x.weight"]
    mapping = renumbered_expert_keys(keys, PREFIX, [10, 3, 11])
    assert mapping[f"{PREFIX}.10.gate_proj.weight"] == f"{PREFIX}.0.gate_proj.weight"
    assert mapping[f"{PREFIX}.3.down_proj.weight_scale_inv"] == f"{PREFIX}.1.down_proj.weight_scale_inv"
    assert mapping[f"{PREFIX}.11.down_proj.weight"] == f"{PREFIX}.2.down_proj.weight"
    assert len(mapping) == 3 * 4  # "experts.1" does not match "experts.10", other modules are untouched
    with pytest.raises(ValueError, match="repeat"):
        renumbered_expert_keys(keys, PREFIX, [1, 1])


class _RowSource(dict):
    """A source that reads row ranges (as a safetensors slice would) and records them."""

    def __init__(self, *args):
        super().__init__(*args)
        self.rows = []

    def get_rows(self, key, start, stop):
        self.rows.append((key, start, stop))
        return self[key][start:stop]


def test_mxfp4_experts_are_read_a_group_at_a_time():
    generator = torch.Generator().manual_seed(0)
    source = _RowSource({
        f"{PREFIX}.down_proj_blocks": torch.randint(0, 256, (8, 64, 1, 16), dtype=torch.uint8, generator=generator),
        f"{PREFIX}.down_proj_scales": torch.randint(110, 130, (8, 64, 1), dtype=torch.uint8, generator=generator),
    })
    whole = read_mxfp4_experts(source, f"{PREFIX}.down_proj", torch.bfloat16)
    group = read_mxfp4_experts(source, f"{PREFIX}.down_proj", torch.bfloat16, experts=range(2, 5))
    assert whole.shape == (8, 32, 64) and torch.equal(group, whole[2:5])
    assert source.rows == [(f"{PREFIX}.down_proj_blocks", 2, 5), (f"{PREFIX}.down_proj_scales", 2, 5)]
    assert torch.equal(read_mxfp4_experts(dict(source), f"{PREFIX}.down_proj", torch.bfloat16, experts=range(6, 8)), whole[6:])


def test_read_parameter_casts_floats_and_refuses_unscaled_quantized_tensors():
    source = {"a.weight": torch.randn(4, 4), "pos": torch.arange(4), "q.weight": torch.zeros(4, 4).to(FP8_DTYPE)}
    assert read_parameter(source, "a.weight", FP8_FMT, torch.bfloat16).dtype == torch.bfloat16
    assert read_parameter(source, "pos", FP8_FMT, torch.bfloat16).dtype == torch.int64
    with pytest.raises(UnsupportedQuantizationError, match="q.weight is stored as torch.float8_e4m3fn"):
        read_parameter(source, "q.weight", FP8_FMT, torch.bfloat16)


def test_kept_fused_tensors_are_sliced_on_the_expert_axis():
    source = {
        f"{PREFIX}.gate_up_proj_blocks": torch.randint(0, 256, (8, 4, 1, 16), dtype=torch.uint8),
        f"{PREFIX}.gate_up_proj_scales": torch.randint(0, 255, (8, 4, 1), dtype=torch.uint8),
        f"{PREFIX}.gate_up_proj_bias": torch.randn(8, 4),
    }
    out = dict(kept_expert_tensors(source, source.keys(), PREFIX, [7, 0]))
    assert set(out) == set(source)
    for key, value in out.items():
        assert torch.equal(value, source[key][[7, 0]])


def test_requantized_and_masked_tensors_keep_checkpoint_names():
    value = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    key = f"{PREFIX}.4.up_proj.weight"
    stored, error = quantized_tensors(key, value, FP8_FMT)
    assert set(stored) == {key, f"{key}_scale_inv"} and stored[key].dtype == FP8_DTYPE and 0 < error < 0.05
    keep = value.abs() > 0.5
    masked = masked_tensors(stored, key, keep, FP8_FMT)
    assert masked[f"{key}_scale_inv"] is stored[f"{key}_scale_inv"]
    before = dequantize_fp8(stored[key], stored[f"{key}_scale_inv"], (16, 16), torch.float32)
    assert torch.equal(dequantize_fp8(masked[key], masked[f"{key}_scale_inv"], (16, 16), torch.float32), torch.where(keep, before, 0.0))

    weight = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(2)) * 0.02  # GPT-OSS (E, cols, rows)
    mx, mx_error = quantized_tensors(f"{PREFIX}.gate_up_proj", weight, MX_FMT)
    assert set(mx) == {f"{PREFIX}.gate_up_proj_blocks", f"{PREFIX}.gate_up_proj_scales"} and mx_error < 0.2
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) > 0.3
    pruned = masked_tensors(mx, f"{PREFIX}.gate_up_proj", keep, MX_FMT)
    dense = gpt_oss_expert_weight(mx[f"{PREFIX}.gate_up_proj_blocks"], mx[f"{PREFIX}.gate_up_proj_scales"], torch.float32)
    read = read_mxfp4_experts(pruned, f"{PREFIX}.gate_up_proj", torch.float32)
    assert torch.equal(read, torch.where(keep, dense, 0.0))
    with pytest.raises(ValueError, match="not quantized"):
        quantized_tensors(key, value, QuantFormat())
    with pytest.raises(ValueError, match="not stored quantized"):
        masked_tensors({"a.weight": value}, "a.weight", keep, FP8_FMT)


def test_mtp_rules():
    config = SimpleNamespace(num_hidden_layers=61, num_nextn_predict_layers=1)
    assert list(mtp_layer_indices(config)) == [61]
    assert is_mtp_tensor("model.layers.61.eh_proj.weight", config) and not is_mtp_tensor("model.layers.6.mlp.gate.weight", config)
    assert scalar_expert_count([None, 96, 200, 128], 256, config) == 256
    plain = SimpleNamespace(num_hidden_layers=4)
    assert not mtp_layer_indices(plain) and scalar_expert_count([None, 96, 200, 128], 256, plain) == 200
