"""Ragged checkpoints: smaller on disk, load with grape and with plain transformers, atomic."""

import json
import sys

import pytest
import torch
from tiny_models import ARCHS, build_tiny_model, save_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM

import grape
from grape.checkpoint import write_checkpoint
from grape.errors import OutputExistsError
from grape.model_io import LazyCausalLM
from grape.output_guard import claim_output
from grape.surgery import prune_block
from grape_kernels.architectures import get_adapter

# layer -> kept experts (ragged: each layer keeps a different number, group-balanced)
RAGGED = {0: [0, 1, 2, 4, 5, 6], 1: [1, 2, 5, 6]}


def _write(src, out, keep=RAGGED, **kwargs):
    lazy = LazyCausalLM.open(src)
    adapter = lazy.adapter

    def transform(index, layer):
        block = adapter.moe_block(layer)
        if block is not None and index in keep:
            prune_block(block, adapter, keep[index])

    save_checkpoint(lazy, out, transform_layer=transform, report={"method": "test"}, **kwargs)
    return lazy


@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_checkpoint_loads_everywhere_with_same_logits(arch, tmp_path):
    src = build_tiny_model(arch, tmp_path / "src")
    out = tmp_path / "pruned"
    _write(src, out)
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    adapter = get_adapter(reference.config)
    for i, layer in enumerate(adapter.decoder_layers(reference)):
        block = adapter.moe_block(layer)
        if block is not None:
            prune_block(block, adapter, RAGGED[i])
    config = json.loads((out / "config.json").read_text())
    expected_counts = [len(RAGGED[i]) if adapter.moe_block(l) is not None else None for i, l in enumerate(adapter.decoder_layers(reference))]
    assert config["grape_experts_per_layer"] == expected_counts
    top = max(c for c in expected_counts if c is not None)
    if adapter.per_layer_config:
        assert config["per_layer_config"] == {str(i): {adapter.count_key: c} for i, c in enumerate(expected_counts) if c not in (None, top)}
    else:  # MLA (DeepSeek): vLLM refuses heterogeneous configs
        assert "per_layer_config" not in config
    loaded_config = AutoConfig.from_pretrained(out)
    assert getattr(loaded_config, adapter.count_key) == max(c for c in expected_counts if c is not None)
    assert (out / "grape_report.json").is_file() and (out / "experts_per_layer.png").stat().st_size > 1000
    ids = torch.randint(0, reference.config.vocab_size, (2, 10))
    with torch.no_grad():
        expected = reference(ids).logits
        ours = grape.load_pruned(out).eval()(ids).logits
        sys.modules.pop("transformers_modules", None)
        plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert "grape" not in type(plain).__module__.split(".")[0]
        theirs = plain(ids).logits
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(theirs, expected)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert out_bytes < src_bytes


def test_modeling_file_does_not_import_grape(tmp_path):
    src = build_tiny_model("mixtral", tmp_path / "src")
    _write(src, tmp_path / "pruned")
    text = (tmp_path / "pruned" / "modeling_grape.py").read_text()
    assert "import grape" not in text and "from grape" not in text


def test_existing_output_is_refused_and_only_a_grape_output_is_replaced(tmp_path):
    src = build_tiny_model("mixtral", tmp_path / "src")
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _write(src, out)
    with pytest.raises(OutputExistsError, match="not a grape output"):
        _write(src, out, overwrite=True)  # a folder of the user's: never deleted
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    _write(src, out, overwrite=True)  # an empty folder may be replaced
    first = (out / "model.safetensors").read_bytes()
    _write(src, out, overwrite=True)  # and so may a previous grape output
    assert (out / "model.safetensors").read_bytes() == first
    assert not list(tmp_path.glob(".pruned.grape-*"))


def test_input_can_never_be_the_output(tmp_path):
    src = build_tiny_model("mixtral", tmp_path / "src")
    with pytest.raises(OutputExistsError, match="never modifies its input"):
        _write(src, src, overwrite=True)


def test_failure_mid_write_leaves_no_output_and_input_unchanged(tmp_path):
    src = build_tiny_model("mixtral", tmp_path / "src")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "pruned"

    def exploding(index, layer):
        if index == 1:
            raise KeyboardInterrupt

    lazy = LazyCausalLM.open(src)
    with pytest.raises(KeyboardInterrupt), claim_output(out, inputs={}, overwrite=False) as claim:
        write_checkpoint(lazy, claim.tmp, transform_layer=exploding)
    assert not out.exists() and not list(tmp_path.glob(".pruned.grape-*"))
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_per_layer_config_that_disagrees_with_grapes_counts_is_refused(tmp_path):
    from grape.checkpoint_files import CheckpointError, read_layout

    out = tmp_path / "pruned"
    _write(build_tiny_model("mixtral", tmp_path / "src"), out)
    config = json.loads((out / "config.json").read_text())
    assert config["allow_global_per_layer_attribute_access"] is True
    read_layout(out)
    config["per_layer_config"] = {"1": {"num_local_experts": 5}}  # grape's list says 4
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="per_layer_config gives layer 1 5 routed experts"):
        read_layout(out)
