"""Tests of grape.info: checkpoint summaries from config.json and safetensors headers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM

import grape.info as info_module
from grape.checkpoint_files import CheckpointError
from grape.info import compare_info, model_info
from grape.info_format import format_comparison, format_info
from grape_kernels.architectures import UnsupportedModelError

SHARED_MODEL = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "mixtral-8x-pydoc"
H, I, E = 32, 64, 4  # hidden size, expert intermediate size, experts per layer


def _mixtral(num_layers: int = 2) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=E,
        num_experts_per_tok=2,
    )
    return MixtralForCausalLM(config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, MixtralForCausalLM]:
    """A tiny Mixtral saved with save_pretrained (per-expert tensor layout on disk)."""
    model = _mixtral()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return path, model


def _write_ragged(folder: Path, model: MixtralForCausalLM, counts: list[int | None]) -> dict:
    """A checkpoint in the fused 3-D layout keeping the first ``counts[i]`` experts of layer i
    (None: the layer's experts and router are left out, as for a dense layer)."""
    folder.mkdir(parents=True)
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if "experts" in parts or name.endswith("mlp.gate.weight"):
            keep = counts[int(parts[2])]
            if keep is None:
                continue
            tensor = tensor[:keep]
        state[name] = tensor.contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["grape_experts_per_layer"] = counts
    (folder / "config.json").write_text(json.dumps(config))
    return state


def test_per_expert_layout_counts_match_the_model(tiny) -> None:
    path, model = tiny
    info = model_info(path)
    expected_expert_params = [
        sum(p.numel() for p in layer.mlp.experts.parameters()) for layer in model.model.layers
    ]
    assert expected_expert_params == [E * (2 * I * H + H * I)] * 2
    assert info["architecture"] == "Mixtral" and info["num_layers"] == 2 and info["top_k"] == 2
    assert [layer["experts"] for layer in info["layers"]] == [E, E]
    assert [layer["expert_parameters"] for layer in info["layers"]] == expected_expert_params
    assert [layer["expert_bytes"] for layer in info["layers"]] == [4 * n for n in expected_expert_params]
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["tensor_bytes"] == 4 * info["parameters"]
    assert info["file_bytes"] == (path / "model.safetensors").stat().st_size
    assert info["total_experts"] == 2 * E
    assert info["routed_expert_parameters"] == sum(expected_expert_params)
    assert info["dtypes"] == {"F32": info["parameters"]}
    assert "sparsity" not in info and "zero_fraction" not in info["layers"][0]


def test_ragged_fused_checkpoint_with_dense_layer(tiny, tmp_path: Path) -> None:
    _, model = tiny
    ragged = _mixtral(num_layers=3)
    state = _write_ragged(tmp_path / "ragged", ragged, [None, 3, 2])
    info = model_info(tmp_path / "ragged")
    assert [layer["experts"] for layer in info["layers"]] == [None, 3, 2]
    assert [layer["expert_parameters"] for layer in info["layers"]] == [
        0,
        3 * (2 * I * H + H * I),
        2 * (2 * I * H + H * I),
    ]
    assert info["parameters"] == sum(t.numel() for t in state.values())
    assert info["total_experts"] == 5
    text = format_info(info)
    assert "dense" in text and "| layer | experts |" in text and "5 in total" in text


def test_config_weights_mismatch_is_an_error(tiny, tmp_path: Path) -> None:
    _, model = tiny
    _write_ragged(tmp_path / "bad", model, [3, 2])
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["grape_experts_per_layer"] = [3, 3]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layer 1 should have 3 routed experts .* hold \[2\]"):
        model_info(tmp_path / "bad")
    config["grape_experts_per_layer"] = [3]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="one positive count .* per decoder layer"):
        model_info(tmp_path / "bad")


def test_per_expert_indices_must_be_consecutive(tiny, tmp_path: Path) -> None:
    path, _ = tiny
    shutil.copytree(path, tmp_path / "gap")
    weights = tmp_path / "gap" / "model.safetensors"
    state = load_file(weights)
    prefix = "model.layers.1.block_sparse_moe.experts."
    kept = {k: v for k, v in state.items() if not k.startswith(prefix + "1.")}
    save_file(kept, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layer 1 .* experts \[0, 2, 3\]; expected consec"):
        model_info(tmp_path / "gap")


def test_deepseek_dense_first_layer_and_shared_experts_not_counted(tmp_path: Path) -> None:
    config = DeepseekV3Config(
        vocab_size=128, hidden_size=H, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    )  # fmt: skip
    model = DeepseekV3ForCausalLM(config)
    model.save_pretrained(tmp_path)
    info = model_info(tmp_path)
    moe = model.model.layers[1].mlp
    assert [layer["experts"] for layer in info["layers"]] == [None, 4]
    assert info["layers"][0]["expert_parameters"] == 0
    assert info["layers"][1]["expert_parameters"] == sum(p.numel() for p in moe.experts.parameters())
    assert sum(p.numel() for p in moe.shared_experts.parameters()) > 0  # present, but not counted


def test_sharded_checkpoint_matches_single_file(tiny, tmp_path: Path) -> None:
    path, model = tiny
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    single, sharded = model_info(path), model_info(tmp_path / "sharded")
    for key in ("parameters", "tensor_bytes", "total_experts", "routed_expert_parameters", "layers"):
        assert sharded[key] == single[key]
    assert sharded["files"] == [s.name for s in shards]
    assert sharded["file_bytes"] == sum(s.stat().st_size for s in shards)

    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"shard\(s\) that do not exist: \['{shards[-1].name}'\]"):
        model_info(tmp_path / "sharded")


def test_index_naming_a_tensor_not_in_its_shard(tiny, tmp_path: Path) -> None:
    path, model = tiny
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not in their shard"):
        model_info(tmp_path / "sharded")


@pytest.mark.parametrize("keep_bytes", [4, 200, -10])
def test_truncated_safetensors_names_the_file(tiny, tmp_path: Path, keep_bytes: int) -> None:
    path, _ = tiny
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep_bytes])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors"):
        model_info(broken)


def test_missing_or_unsupported_inputs(tiny, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        model_info(tmp_path / "nope")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        model_info(tmp_path / "noconfig")
    (tmp_path / "noweights").mkdir()
    shutil.copy(tiny[0] / "config.json", tmp_path / "noweights" / "config.json")
    with pytest.raises(CheckpointError, match="has no safetensors weights"):
        model_info(tmp_path / "noweights")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read .*config.json"):
        model_info(tmp_path / "badjson")
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    with pytest.raises(UnsupportedModelError, match="Supported: Mixtral"):
        model_info(tmp_path / "dense")


def _sparsify(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero a known pattern: half the rows of every layer-0 gate_up, every 3rd down_proj entry,
    and a column block of layer-1 q_proj."""
    out = {}
    for name, tensor in state.items():
        tensor = tensor.clone()
        if name.startswith("model.layers.0.") and name.endswith("experts.gate_up_proj"):
            tensor[:, : tensor.shape[1] // 2] = 0
        elif name.endswith("experts.down_proj"):
            tensor.view(-1)[::3] = 0
        elif name == "model.layers.1.self_attn.q_proj.weight":
            tensor[:, :8] = 0
        out[name] = tensor.contiguous()
    return out


def _zero_reference(state: dict[str, torch.Tensor], predicate) -> float:
    zeros = sum(int((t == 0).sum()) for n, t in state.items() if predicate(n))
    total = sum(t.numel() for n, t in state.items() if predicate(n))
    return zeros / total


@pytest.mark.parametrize("chunk", [None, 100])
def test_sparsity_counts_exact_zeros(tiny, tmp_path: Path, monkeypatch, chunk: int | None) -> None:
    if chunk is not None:  # force the row-chunked read path on every tensor
        monkeypatch.setattr(info_module, "_ZERO_COUNT_CHUNK", chunk)
    _, model = tiny
    folder = tmp_path / "sparse"
    _write_ragged(folder, model, [4, 4])
    state = _sparsify(load_file(folder / "model.safetensors"))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

    info = model_info(folder, sparsity=True)
    by_type = info["sparsity"]["by_type"]
    assert by_type["gate_up_proj"]["zero_fraction"] == _zero_reference(state, lambda n: n.endswith("gate_up_proj"))
    assert by_type["gate_up_proj"]["zero_fraction"] == pytest.approx(0.25)
    assert by_type["down_proj"]["zero_fraction"] == _zero_reference(state, lambda n: n.endswith("down_proj"))
    assert by_type["attention"]["zero_fraction"] == _zero_reference(state, lambda n: ".self_attn." in n)
    assert by_type["other"]["zeros"] == 0
    assert sum(v["parameters"] for v in by_type.values()) == info["parameters"]
    assert info["sparsity"]["zero_fraction"] == _zero_reference(state, lambda n: True)
    layer0 = info["layers"][0]
    assert layer0["zero_fraction"] == _zero_reference(state, lambda n: n.startswith("model.layers.0."))
    assert layer0["zero_fraction_by_type"]["gate_up_proj"] == 0.5
    assert info["layers"][1]["zero_fraction_by_type"]["gate_up_proj"] == 0.0
    assert info["layers"][1]["zero_fraction_by_type"]["attention"] == _zero_reference(
        state, lambda n: n.startswith("model.layers.1.self_attn.")
    )
    assert "gate_up_proj 50.00%" in format_info(info)


def test_compare_info_ratios(tiny, tmp_path: Path) -> None:
    path, model = tiny
    _write_ragged(tmp_path / "pruned", model, [3, 2])
    comparison = compare_info(path, tmp_path / "pruned")
    before, after, ratio = comparison["before"], comparison["after"], comparison["ratio"]
    per_expert = 2 * I * H + H * I
    router_rows_removed = (1 + 2) * H
    assert after["parameters"] == before["parameters"] - 3 * per_expert - router_rows_removed
    assert ratio["parameters"] == after["parameters"] / before["parameters"]
    assert ratio["total_experts"] == 5 / 8
    assert ratio["routed_expert_parameters"] == 5 / 8
    assert ratio["file_bytes"] == (tmp_path / "pruned" / "model.safetensors").stat().st_size / (
        path / "model.safetensors"
    ).stat().st_size
    text = format_comparison(comparison)
    assert "| total experts" in text and "0.625" in text
    assert "|     1 |              4 |             2 |" in text

    _write_ragged(tmp_path / "three", _mixtral(num_layers=3), [4, 4, 4])
    with pytest.raises(ValueError, match="cannot compare .* \\(2 layers\\) with .* \\(3 layers\\)"):
        compare_info(path, tmp_path / "three")


@pytest.mark.skipif(not SHARED_MODEL.is_dir(), reason="../shared/models/mixtral-8x-pydoc is absent")
def test_shared_trained_model() -> None:
    info = model_info(SHARED_MODEL)
    training = json.loads((SHARED_MODEL / "training.json").read_text())
    assert info["parameters"] == training["params"]
    assert [layer["experts"] for layer in info["layers"]] == [8] * 8
    assert all(layer["expert_parameters"] == 8 * 3 * 512 * 256 for layer in info["layers"])
    assert info["dtypes"] == {"BF16": training["params"]}
    assert info["file_bytes"] == (SHARED_MODEL / "model.safetensors").stat().st_size
