"""The sparsify pipeline on saved tiny models: sequential layers, checkpoint, composition, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, build_tiny_model, save_checkpoint

import grape.pipeline
from grape.checkpoint import load_pruned
from grape.errors import OutputExistsError
from grape.model_io import LazyCausalLM
from grape.sparsity import sparsify as sparsify_module
from grape.sparsity.collect import capture_routed_inputs
from grape.sparsity.masks import parse_pattern
from grape.sparsity.sparsify import SparsifyOptions, SparsityPlan, sparsify, sparsify_experts
from grape.surgery import prune_block
from grape_kernels.architectures import UnsupportedModelError


def sparsify_model(model: Path, out: Path, **options) -> dict:
    return sparsify(SparsifyOptions(model=str(model), out=str(out), **options))


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _calib_ids(samples: int = 6, seq_len: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def test_moe_pruner_matches_a_sequential_in_memory_reference(tiny_mixtral_dir, tmp_path) -> None:
    """Layer 1 must be scored on what the already pruned layer 0 produces."""
    from transformers import AutoModelForCausalLM

    before = _digest(tiny_mixtral_dir)
    ids = _calib_ids()
    report = sparsify_model(
        tiny_mixtral_dir, tmp_path / "out", method="moe_pruner", sparsity=0.5, calib_ids=ids, batch_size=4
    )
    assert _digest(tiny_mixtral_dir) == before  # the input is never modified

    reference = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32)
    plan = SparsityPlan.build("moe_pruner", 0.5, parse_pattern("unstructured"))
    with torch.no_grad():
        for layer in reference.model.layers:
            with capture_routed_inputs(layer.mlp.experts, layer=0) as batches:
                for batch in ids.split(4):
                    reference(input_ids=batch, use_cache=False)
            sparsify_experts(layer.mlp.experts, batches, plan)

    pruned = load_pruned(tmp_path / "out", dtype=torch.float32)
    ref_state, out_state = reference.state_dict(), pruned.state_dict()
    assert ref_state.keys() == out_state.keys()
    for name, tensor in ref_state.items():
        assert torch.equal(tensor != 0, out_state[name] != 0), name
        torch.testing.assert_close(out_state[name], tensor, rtol=0, atol=0)
    for i in (0, 1):
        for name in ("gate_up_proj", "down_proj"):
            weight = out_state[f"model.layers.{i}.mlp.experts.{name}"]
            assert ((weight == 0).sum(dim=2) == weight.shape[2] // 2).all()

    saved = json.loads((tmp_path / "out" / "grape_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["method"] == "moe_pruner" and saved["pattern"] == "unstructured"
    assert saved["expert_weights"]["sparsity"] == 0.5
    assert saved["calibration"]["tokens"] == ids.numel()
    assert sum(saved["layers"]["0"]["tokens_per_expert"]) == ids.numel() * 2
    assert set(saved["timings_s"]) == {"setup", "calibration_and_scoring", "save", "total"}


def test_magnitude_needs_no_calibration_and_keeps_other_weights(tiny_mixtral_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sparsify_module, "run_layerwise", _fail("magnitude must not calibrate"))
    report = sparsify_model(tiny_mixtral_dir, tmp_path / "out", method="magnitude", sparsity=None, pattern="2:4")
    assert report["calibration"] is None and report["pattern"] == "2:4"
    source = load_pruned(tiny_mixtral_dir, dtype=torch.float32).state_dict()
    out = load_pruned(tmp_path / "out", dtype=torch.float32).state_dict()
    for name, tensor in source.items():
        if ".experts." in name:
            groups = (out[name] != 0).reshape(*tensor.shape[:2], -1, 4)
            assert (groups.sum(dim=-1) == 2).all(), name
            kept = out[name] != 0
            torch.testing.assert_close(out[name][kept], tensor[kept])
        else:
            assert torch.equal(out[name], tensor), name  # routers, attention, norms stay dense


def test_sparsifies_a_ragged_expert_pruned_model_and_records_both_steps(tiny_mixtral_dir, tmp_path) -> None:
    lazy = LazyCausalLM.open(tiny_mixtral_dir)
    kept = {0: [0, 2, 3], 1: [1, 3]}
    save_checkpoint(
        lazy,
        tmp_path / "pruned",
        transform_layer=lambda i, layer: prune_block(layer.mlp, lazy.adapter, kept[i]),
        report={"step": "expert_pruning", "method": "frequency", "kept_experts": {str(k): v for k, v in kept.items()}},
    )
    report = sparsify_model(
        tmp_path / "pruned", tmp_path / "sparse", method="wanda", sparsity=0.25, calib_ids=_calib_ids()
    )
    assert [step["step"] for step in report["previous_steps"]] == ["expert_pruning"]
    assert report["kept_experts"] == {"0": [0, 2, 3], "1": [1, 3]}
    assert report["experts_per_layer"] == [3, 2]
    assert [len(report["layers"][str(i)]["tokens_per_expert"]) for i in (0, 1)] == [3, 2]
    state = load_pruned(tmp_path / "sparse", dtype=torch.float32).state_dict()
    for i, count in ((0, 3), (1, 2)):
        weight = state[f"model.layers.{i}.mlp.experts.down_proj"]
        assert weight.shape[0] == count
        assert ((weight == 0).sum(dim=2) == 4).all()  # floor(0.25 * 16)


def _fail(message: str):
    def fail(*args, **kwargs):
        raise AssertionError(message)

    return fail


@pytest.mark.parametrize(
    ("kwargs", "error", "why"),
    [
        ({"sparsity": 1.0}, ValueError, r"\[0, 1\)"),
        ({"sparsity": -0.5}, ValueError, r"\[0, 1\)"),
        ({"sparsity": None, "pattern": "3:2"}, ValueError, "0 < N < M"),
        ({"sparsity": None, "pattern": "a:b"}, ValueError, "N:M with integers"),
        ({"sparsity": None, "pattern": "1:3"}, ValueError, "M=3 does not divide the input width 32 of layer 0 gate_up_proj"),
        ({"sparsity": 0.5, "method": "obs"}, ValueError, "unknown sparsification method 'obs'; available: magnitude, moe_pruner, wanda"),
        ({"sparsity": 0.5, "calib_ids": None}, ValueError, "needs calibration data"),
        ({"sparsity": 0.5, "calib_ids": torch.zeros(0, 8, dtype=torch.long)}, ValueError, "needs calibration data"),
    ],
)
def test_bad_input_fails_before_heavy_work(kwargs, error, why, tiny_mixtral_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sparsify_module, "run_layerwise", _fail("calibration started"))
    monkeypatch.setattr(grape.pipeline, "write_checkpoint", _fail("writing started"))
    options = {"method": "moe_pruner", "calib_ids": _calib_ids()} | kwargs
    with pytest.raises(error, match=why):
        sparsify_model(tiny_mixtral_dir, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_refuses_existing_output_and_models_without_moe_layers(tiny_mixtral_dir, tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2MoeConfig

    monkeypatch.setattr(sparsify_module, "run_layerwise", _fail("calibration started"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        sparsify_model(tiny_mixtral_dir, tmp_path / "exists", method="moe_pruner", sparsity=0.5, calib_ids=_calib_ids())

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**small))
    dense.save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedModelError, match="Mixtral"):
        sparsify_model(tmp_path / "llama", tmp_path / "out", method="magnitude", sparsity=0.5)

    no_moe = AutoModelForCausalLM.from_config(
        Qwen2MoeConfig(**small, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=16, mlp_only_layers=[0, 1])
    )
    no_moe.save_pretrained(tmp_path / "qwen-dense")
    with pytest.raises(UnsupportedModelError, match="no layer with routed experts"):
        sparsify_model(tmp_path / "qwen-dense", tmp_path / "out", method="magnitude", sparsity=0.5)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_gets_exact_2_4_experts_and_nothing_else_changes(arch, tmp_path) -> None:
    """Layouts (GPT-OSS transposed with biases), shared experts, dense first layers, routing kinds."""
    source = build_tiny_model(arch, tmp_path / arch)
    report = sparsify_model(source, tmp_path / "out", method="moe_pruner", sparsity=0.5, pattern="2:4", calib_ids=_calib_ids())
    assert report["expert_weights"]["sparsity"] == 0.5
    before = load_pruned(source, dtype=torch.float32).state_dict()
    after = load_pruned(tmp_path / "out", dtype=torch.float32).state_dict()
    transposed = arch == "gpt_oss"
    pruned = 0
    for name, tensor in before.items():
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            kept = after[name] != 0
            kept = kept.transpose(1, 2) if transposed else kept  # (E, out, in)
            assert (kept.reshape(*kept.shape[:2], -1, 4).sum(dim=-1) == 2).all(), name
            torch.testing.assert_close(after[name][after[name] != 0], tensor[after[name] != 0], rtol=0, atol=0)
            pruned += 1
        else:
            assert torch.equal(after[name], tensor), name  # routers, biases, shared experts, attention
    assert pruned == 2 * len(report["layers"])
