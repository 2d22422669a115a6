"""Streaming safetensors shards: each tensor goes to disk as it is added.

A pruned checkpoint is written layer by layer, and the writer must not hold more than the
layer it is given: :class:`ShardWriter` writes every tensor's bytes straight into the open
shard file and keeps only its header entry. The safetensors header comes *first* in the file,
so each shard reserves ``header_bytes`` at its start and fills them in when it is closed,
padded with spaces (which the format allows; the header length stays a multiple of 8). A
shard is closed when it reaches ``max_bytes`` or when one more header entry would not fit.

Everything goes through ordinary Python file I/O, so a full disk or a read-only location is an
``OSError`` with its errno (the command line explains it in one line), never a library error.
The output is a deterministic function of the tensors: no timestamps, fixed key order.

Quantized tensors (FP8 codes and scales, MXFP4 blocks) are copied in their stored dtype
(``add(..., dtype=...)``), and a tensor can be written in consecutive chunks
(:meth:`ShardWriter.add_stream`), so a layer's fused experts never need to be whole in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from grape.checkpoint_files import SAFETENSORS_DTYPES

__all__ = ["ShardWriter", "header_bound"]


MAX_SHARD_BYTES = 2 * 1024**3
_METADATA = {"format": "pt"}
_MAX_HEADER_BYTES = 1 << 20  # a shard's reserved header region never exceeds 1 MiB


def _entry(name: str, dtype: str, shape: Iterable[int], start: int, end: int) -> str:
    return json.dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}}, separators=(",", ":"))[1:-1]


def header_bound(names_and_shapes: Iterable[tuple[str, Iterable[int]]]) -> int:
    """Header bytes that certainly hold these tensors (offsets at their widest), capped at 1 MiB."""
    widest = 10**19
    entries = sum(len(_entry(n, "F8_E4M3", s, widest, widest)) + 1 for n, s in names_and_shapes)
    return min(_MAX_HEADER_BYTES, 64 + len(json.dumps({"__metadata__": _METADATA})) + entries)


class ShardWriter:
    """Writes tensors into ``shard-NNNNN.safetensors`` files in ``directory``, then names them.

    Call :meth:`add` (or :meth:`add_stream`) per tensor and :meth:`finish` once: a single
    shard becomes ``model.safetensors``, several become ``model-0000i-of-0000n.safetensors`` with
    a ``model.safetensors.index.json``, the layout transformers writes and reads.
    """

    def __init__(self, directory: Path, dtype: torch.dtype, *, header_bytes: int, max_bytes: int = MAX_SHARD_BYTES):
        self.directory = directory
        self.dtype = dtype
        self.reserved = max(64, (header_bytes + 7) // 8 * 8)
        self.max_bytes = max_bytes
        self.shards: list[list[str]] = []
        self.total_bytes = 0
        self._file = None
        self._entries: list[str] = []
        self._header_used = 0
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Write ``tensor`` under ``name``: in ``dtype`` if given (e.g. a stored tensor copied as it
        is), otherwise floating point converted to the checkpoint dtype."""
        tensor = tensor.detach().to("cpu")
        if dtype is not None:
            tensor = tensor.to(dtype)
        elif tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        self.add_stream(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def add_stream(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], chunks: Iterable[torch.Tensor]) -> None:
        """Write one tensor of ``shape`` whose bytes come as consecutive ``chunks`` along dim 0.

        The header entry is made from ``shape`` up front, so a tensor larger than memory (a
        layer's fused experts, one expert at a time) is written without ever being whole.
        """
        size = math.prod(shape) * dtype.itemsize
        code = SAFETENSORS_DTYPES[dtype]
        entry = _entry(name, code, shape, self._offset, self._offset + size)
        full = bool(self._entries) and (
            self._offset + size > self.max_bytes or self._header_used + len(entry) + 1 > self.reserved - 8
        )
        if full:
            self._close_shard()
            entry = _entry(name, code, shape, 0, size)
        if self._file is None:
            self._open_shard()
        if self._header_used + len(entry) + 1 > self.reserved - 8:
            raise ValueError(f"the header entry of {name} does not fit the reserved {self.reserved} bytes")
        written = 0
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise ValueError(f"{name}: a {chunk.dtype} chunk in a {dtype} tensor")
            chunk = chunk.detach().to("cpu").contiguous()
            if chunk.numel():
                try:
                    self._file.write(memoryview(chunk.reshape(-1).view(torch.uint8).numpy()))
                except OSError as exc:  # name the file: a bare ENOSPC does not say where
                    raise OSError(exc.errno, exc.strerror, self._file.name) from exc
            written += chunk.numel() * chunk.element_size()
        if written != size:
            raise ValueError(f"{name}: {written} bytes were written for a tensor of {size}")
        self._entries.append(entry)
        self._header_used += len(entry) + 1
        self._offset += size
        self.total_bytes += size
        self.shards[-1].append(name)

    def _open_shard(self) -> None:
        path = self.directory / f"shard-{len(self.shards):05d}.safetensors"
        self._file = open(path, "wb")  # noqa: SIM115  (closed in _close_shard)
        self._file.seek(self.reserved)
        self.shards.append([])
        self._entries, self._offset = [], 0
        self._header_used = len(json.dumps({"__metadata__": _METADATA}, separators=(",", ":")))

    def _close_shard(self) -> None:
        metadata = json.dumps({"__metadata__": _METADATA}, separators=(",", ":"))[1:-1]
        header = ("{" + ",".join([metadata, *self._entries]) + "}").encode()
        header = header.ljust(self.reserved - 8, b" ")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", len(header)) + header)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def close(self) -> None:
        """Close an open shard file without finishing (on errors; the directory is discarded)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> list[str]:
        """Close the last shard and give the shards their final names; returns those names."""
        if self._file is not None:
            self._close_shard()
        count = len(self.shards)
        if count == 1:
            os.replace(self.directory / "shard-00000.safetensors", self.directory / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, tensors in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f"shard-{i:05d}.safetensors", self.directory / final)
            weight_map.update(dict.fromkeys(tensors, final))
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [*names, "model.safetensors.index.json"]
