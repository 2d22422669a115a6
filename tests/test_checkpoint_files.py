"""Reading checkpoint folders: headers checked against the file, per-expert tensors stacked
exactly as transformers loads them, tensor names classified."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build_tiny_model

from grape.checkpoint_files import CheckpointError, CheckpointIndex, read_header, tensor_type


def test_a_per_expert_checkpoint_loads_as_the_fused_parameters_transformers_builds(tmp_path):
    from transformers import AutoModelForCausalLM

    src = build_tiny_model("mixtral", tmp_path / "m")
    index = CheckpointIndex(src)
    assert any(".experts.3.w1.weight" in k for k in index.keys())  # saved one tensor per expert
    reference = AutoModelForCausalLM.from_pretrained(src).state_dict()
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj", "model.norm.weight"):
        assert torch.equal(index.load(name), reference[name]), name
    assert index.load("model.layers.0.mlp.experts.nothing") is None
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(index.load(fused, torch.float64, range(3, 6)), reference[fused][3:6].double())
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(index.get_rows(key, 5, 9), reference[key][5:9])


def test_reads_leave_no_file_mapped(tmp_path):
    """Every read is a plain file read: after reading everything, no weight file is mapped into the process."""
    src = build_tiny_model("qwen3_moe", tmp_path / "m")
    index = CheckpointIndex(src)
    for key in index.keys():
        index.get(key)
    maps = open("/proc/self/maps").read()
    assert all(str(path.resolve()) not in maps for path in index.files())


def _raw(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_headers_are_checked_against_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(2, 3, dtype=torch.bfloat16)}, good)
    entries = {e.name: e for e in read_header(good)}
    assert (entries["a"].shape, entries["a"].dtype, entries["a"].nbytes) == ((4,), "F32", 16)
    assert entries["b"].nbytes == 12

    cases = {
        "truncated": (good.read_bytes()[:-4], "past the data"),
        "empty": (b"", "header length"),
        "garbage": (b"\xff" * 64, "header length"),
    }
    for name, (data, why) in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{name}.safetensors is not a readable safetensors file .*{why}"):
            read_header(tmp_path / f"{name}.safetensors")
    _raw(tmp_path / "dtype.safetensors", {"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(CheckpointError, match="unknown dtype Q7"):
        read_header(tmp_path / "dtype.safetensors")
    _raw(tmp_path / "size.safetensors", {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError, match="needs bytes 0..4"):
        read_header(tmp_path / "size.safetensors")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.layers.3.block_sparse_moe.experts.7.w1.weight", "gate_up_proj"),
        ("model.layers.3.mlp.experts.2.up_proj.weight", "gate_up_proj"),
        ("model.layers.3.mlp.experts.gate_up_proj", "gate_up_proj"),
        ("model.layers.3.mlp.experts.gate_up_proj_bias", "gate_up_proj"),
        ("model.layers.3.block_sparse_moe.experts.0.w2.weight", "down_proj"),
        ("model.layers.3.mlp.experts.down_proj", "down_proj"),
        ("model.layers.3.mlp.shared_experts.down_proj.weight", "other"),  # shared, not routed
        ("model.layers.3.mlp.shared_expert.gate_proj.weight", "other"),
        ("model.layers.3.self_attn.q_proj.weight", "attention"),
        ("model.embed_tokens.weight", "other"),
    ],
)
def test_tensor_names_are_classified(name, kind):
    assert tensor_type(name) == kind
