"""Opening models: devices, dtypes, configs, tokenizers and damaged weights are checked up front."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_models import build_tiny_model

from grape.errors import InputError
from grape.model_io import (
    CheckpointError,
    LazyCausalLM,
    check_positions,
    load_config,
    load_tokenizer,
    parse_device,
    parse_dtype,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("mixtral", tmp_path_factory.mktemp("model_io") / "model")


def test_devices_are_checked_before_any_tensor_moves():
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'foo'"):
        parse_device("foo")
    with pytest.raises(InputError, match="meta holds no data"):
        parse_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no cuda device is available"):
            parse_device("cuda")
    with pytest.raises(InputError, match=r"--device cuda:99"):
        parse_device("cuda:99")


def test_dtypes_by_name_and_alias():
    assert parse_dtype(None) is None and parse_dtype("auto") is None
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(InputError, match="unknown dtype 'int8'"):
        parse_dtype("int8")


def test_config_tokenizer_and_positions(model_dir, tmp_path):
    config = load_config(model_dir)
    check_positions(config, 128)
    with pytest.raises(InputError, match=r"--seq-len 129 exceeds the model's max_position_embeddings \(128\)"):
        check_positions(config, 129)
    assert load_tokenizer(model_dir).eos_token == "<|endoftext|>"

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cannot read .*config.json"):
        load_config(broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()
    with pytest.raises(CheckpointError, match=f"no tokenizer files in {broken}"):
        load_tokenizer(broken)


def test_corrupt_and_truncated_safetensors(model_dir, tmp_path):
    for damage in ("truncate", "garbage"):
        bad = tmp_path / damage
        shutil.copytree(model_dir, bad)
        weights = bad / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
        with pytest.raises(CheckpointError, match="safetensors"):
            LazyCausalLM.open(bad)


def test_open_checks_the_device_first(model_dir):
    with pytest.raises(InputError, match="unknown device"):
        LazyCausalLM.open(model_dir, device="foo")
