"""The full-width DeepSeek-V3 layer builder (benchmarks/deepseek_v3_layer.py), run at a tiny width: same code path."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from grape.quant.formats import FP8, check_tensors, detect_format, tensor_infos
from grape.quant.layout import read_parameter

TINY = dict(
    hidden_size=64, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
    n_group=4, topk_group=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32,
    qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
)


def _builder():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "deepseek_v3_layer.py"
    spec = importlib.util.spec_from_file_location("deepseek_v3_layer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


class _Shards:
    """A TensorSource over a sharded checkpoint."""

    def __init__(self, directory: Path):
        weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
        self.files = {key: str(directory / name) for key, name in weight_map.items()}

    def __contains__(self, key):
        return key in self.files

    def get(self, key):
        with safe_open(self.files[key], framework="pt") as handle:
            return handle.get_tensor(key)


def test_full_width_plan_is_the_release_layout():
    builder = _builder()
    plan = {t.name: t for t in builder.planned_tensors(builder.layer_config())}
    expert = plan["model.layers.0.mlp.experts.255.gate_proj.weight"]
    assert (expert.dtype, expert.shape) == ("F8_E4M3", (2048, 7168))
    assert plan["model.layers.0.mlp.experts.255.down_proj.weight_scale_inv"].shape == (56, 16)
    assert plan["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 56)
    assert plan["model.layers.0.mlp.shared_experts.up_proj.weight"].shape == (2048, 7168)
    assert (plan["model.layers.0.mlp.gate.weight"].dtype, plan["model.layers.0.mlp.gate.e_score_correction_bias"].dtype) == ("BF16", "F32")
    assert "model.layers.0.mlp.experts.256.gate_proj.weight" not in plan
    assert 11.0e9 < sum(t.nbytes for t in plan.values()) < 12.5e9


def test_tiny_build_loads_in_transformers_and_reads_alike(tmp_path):
    from transformers import AutoModelForCausalLM

    builder = _builder()
    config = builder.layer_config(vocab_size=256, **TINY)
    out = tmp_path / "layer"
    total = builder.build(out, config, shard_bytes=50_000)
    infos = tensor_infos(out)
    assert sum(info.numel * (1 if info.dtype == "F8_E4M3" else 4 if info.dtype == "F32" else 2) for info in infos.values()) == total
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    saved = json.loads((out / "config.json").read_text())
    fmt = detect_format(saved)
    assert fmt.method == FP8 and saved["num_hidden_layers"] == 1 and saved["first_k_dense_replace"] == 0
    check_tensors(fmt, infos)

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (16, 64, 64)
    source = _Shards(out)
    for name, value in model.named_parameters():
        head, _, leaf = name.rpartition(".experts.")
        if head and leaf in ("gate_up_proj", "down_proj"):
            parts = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
            ours = torch.stack([
                torch.cat([read_parameter(source, f"{head}.experts.{j}.{p}.weight", fmt, value.dtype) for p in parts])
                for j in range(value.shape[0])
            ])
        else:
            ours = read_parameter(source, name, fmt, value.dtype)
        assert torch.equal(ours, value), name
    weights = model.model.layers[0].mlp.experts.down_proj.float()
    assert weights.std().item() == pytest.approx(builder.WEIGHT_STD, rel=0.2)


def test_cli_refuses_an_existing_directory_and_missing_space(tmp_path, capsys, monkeypatch):
    builder = _builder()
    assert builder.main([str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err
    monkeypatch.setattr(builder.shutil, "disk_usage", lambda _: type("U", (), {"free": 10**9})())
    assert builder.main([str(tmp_path / "new")]) == 2
    assert "needs 11" in capsys.readouterr().err and not (tmp_path / "new").exists()
