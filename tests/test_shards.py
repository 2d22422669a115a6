"""Streaming safetensors shards: what safetensors and transformers read back, bounded shards."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from grape.shards import ShardWriter, header_bound


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(7, 3, generator=gen),
        "b.bias": torch.randn(5, generator=gen).to(torch.bfloat16),  # 10 bytes: what follows is unaligned
        "c.ids": torch.arange(6, dtype=torch.int64),
        "d.flag": torch.tensor([True, False, True]),
        "e.empty": torch.zeros(0, 4),
        "f.scalar": torch.tensor(2.5),
    }


def _bound(tensors):
    return header_bound((n, t.shape) for n, t in tensors.items())


def test_one_shard_is_model_safetensors_and_reads_back_exactly(tmp_path):
    tensors = _tensors()
    writer = ShardWriter(tmp_path, torch.float32, header_bytes=_bound(tensors))
    for name, tensor in tensors.items():  # in this order, not sorted by alignment
        writer.add(name, tensor)
    assert writer.finish() == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        expected = tensor.float() if tensor.dtype == torch.bfloat16 else tensor  # floating -> checkpoint dtype
        assert loaded[name].dtype == expected.dtype and torch.equal(loaded[name], expected), name
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_shards_are_bounded_and_indexed_like_transformers(tmp_path):
    layers = [_tensors(seed) for seed in range(4)]
    bound = header_bound((f"{i}.{n}", t.shape) for i, layer in enumerate(layers) for n, t in layer.items())
    writer = ShardWriter(tmp_path, torch.bfloat16, header_bytes=bound, max_bytes=150)
    for i, layer in enumerate(layers):
        for n, t in layer.items():
            writer.add(f"{i}.{n}", t)
    names = writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert names == [*shards, "model.safetensors.index.json"] and len(shards) > 2
    loaded = {}
    for shard in shards:
        part = load_file(tmp_path / shard)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= max(150, max(t.numel() * t.element_size() for t in part.values()))
        loaded |= part
    assert sorted(loaded) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    assert torch.equal(loaded["2.a.weight"], layers[2]["a.weight"].to(torch.bfloat16))


def test_a_full_header_starts_a_new_shard(tmp_path):
    tensors = {f"t{i}": torch.full((2,), float(i)) for i in range(40)}
    writer = ShardWriter(tmp_path, torch.float32, header_bytes=400)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = {}
    for shard in set(index["weight_map"].values()):
        loaded |= load_file(tmp_path / shard)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_failed_write_names_the_file(tmp_path):
    writer = ShardWriter(tmp_path, torch.float32, header_bytes=1000)
    writer.add("a", torch.ones(3))
    writer._file.close()
    writer._file = open("/dev/full", "wb", buffering=0)  # noqa: SIM115  (every write: ENOSPC)
    with pytest.raises(OSError) as caught:
        writer.add("b", torch.ones(3))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == "/dev/full"
    writer.close()


def test_streamed_tensors_and_stored_dtypes_are_written_as_given(tmp_path):
    gen = torch.Generator().manual_seed(1)
    fused = torch.randn(5, 3, 4, generator=gen)
    codes = torch.randn(6, 8, generator=gen).to(torch.float8_e4m3fn)
    writer = ShardWriter(tmp_path, torch.bfloat16, header_bytes=header_bound([("fused", fused.shape), ("codes", codes.shape)]))
    writer.add_stream("fused", torch.float32, tuple(fused.shape), (fused[i : i + 1] for i in range(5)))  # one row at a time
    writer.add("codes", codes, dtype=codes.dtype)  # a stored FP8 tensor is copied, not cast
    with pytest.raises(ValueError, match="bytes were written"):
        writer.add_stream("short", torch.float32, (2, 4), [torch.zeros(1, 4)])
    writer.close()
    writer = ShardWriter(tmp_path, torch.bfloat16, header_bytes=header_bound([("fused", fused.shape), ("codes", codes.shape)]))
    writer.add_stream("fused", torch.float32, tuple(fused.shape), (fused[i : i + 1] for i in range(5)))
    writer.add("codes", codes, dtype=codes.dtype)
    writer.finish()
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded["fused"].dtype == torch.float32 and torch.equal(loaded["fused"], fused)
    assert loaded["codes"].dtype == torch.float8_e4m3fn and torch.equal(loaded["codes"].view(torch.uint8), codes.view(torch.uint8))
