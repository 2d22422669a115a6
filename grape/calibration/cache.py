"""The statistics cache on disk: plain data that is safe to share between runs and users.

One file per MoE layer, ``<cache>/stats/<key>/layer_NNNN.safetensors``: the layer's statistics
as float64 tensors, with the scalar fields and the routing rule as JSON in the safetensors
metadata. Nothing in it can carry code (no pickle), so a cache directory that others can write
to (``~/.cache`` is often shared) cannot make the next ``grape prune`` run anything.

A file is trusted only after it passed every check: the format name and version, the cache key
and layer it was written for, and every tensor's shape and dtype. A file that fails (truncated,
corrupt, from another version, another key or another program) is recomputed with a one-line
warning; the run never fails because of its cache. Writes go to a temporary file with a unique
name beside the target and are moved into place with ``os.replace``, so concurrent runs sharing
a cache each see a complete file, and the statistics being deterministic, the same one. A cache
that cannot be written (read-only, full) only costs the recomputation next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from grape.errors import GrapeWarning
from grape.model_io import LazyCausalLM
from grape.stats import LayerStats

__all__ = ["FORMAT", "VERSION", "default_cache_dir", "stats_cache_key", "StatsCache"]

FORMAT = "grape-layer-stats"
VERSION = 4  # 4: Grams from float32 blocks of the sampled outputs; 3: safetensors + JSON (2 was torch.save)
_STALE_TMP_SECONDS = 3600  # a temporary file this old belongs to a run that died


def default_cache_dir() -> Path:
    """``$GRAPE_CACHE/stats``, by default ``~/.cache/grape/stats``."""
    return Path(os.environ.get("GRAPE_CACHE", Path.home() / ".cache" / "grape")) / "stats"


def stats_cache_key(
    lazy: LazyCausalLM, input_ids: torch.Tensor, *, sample_tokens: int, batch_size: int, seed: int, sequential: bool
) -> str:
    """Identifies (weights, calibration ids, settings): same key, same statistics.

    The seed and batch size are part of it because they choose the sampled tokens.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(lazy.config.to_dict(), sort_keys=True, default=str).encode())
    for path in sorted(lazy.index.files()):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(input_ids.cpu().numpy().tobytes())
    digest.update(f"{sample_tokens}:{batch_size}:{seed}:{sequential}:{lazy.dtype}:{VERSION}".encode())
    return digest.hexdigest()[:24]


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory (ValueError if malformed)."""
    length = int.from_bytes(data[:8], "little")
    if len(data) < 8 or not 0 < length <= len(data) - 8:
        raise ValueError(f"header length {length} does not fit the file's {len(data)} bytes")
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("no metadata")
    return metadata


class StatsCache:
    """The cached statistics of one key; see the module docs for the format and the checks."""

    def __init__(self, root: Path, key: str) -> None:
        self.key = key
        self.directory = root / key
        self.writable = True
        self._remove_stale_temporaries()

    def path(self, layer: int) -> Path:
        return self.directory / f"layer_{layer:04d}.safetensors"

    def load(self, layer: int) -> LayerStats | None:
        """The cached statistics of ``layer``, or None when absent or not trustworthy (warned)."""
        path = self.path(layer)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            return self._distrust(path, exc.strerror or str(exc))
        try:
            metadata = _metadata(data)
            if metadata.get("format") != FORMAT or metadata.get("version") != str(VERSION):
                raise ValueError(f"written by {metadata.get('format')!r} version {metadata.get('version')!r}")
            if metadata.get("key") != self.key or metadata.get("layer") != str(layer):
                raise ValueError("written for another model, calibration set or layer")
            stats = LayerStats.from_tensors(load_tensors(data), json.loads(metadata["info"]))
            if stats.layer != layer:
                raise ValueError(f"holds layer {stats.layer}")
        except Exception as exc:  # any malformed content means the same thing: recompute
            return self._distrust(path, str(exc) or type(exc).__name__)
        return stats

    def _distrust(self, path: Path, reason: str) -> None:
        warnings.warn(f"ignoring cache file {path} ({' '.join(reason.split())[:200]}); recomputing it", GrapeWarning, stacklevel=3)
        return None

    def save(self, stats: LayerStats) -> None:
        """Store ``stats`` atomically under a unique temporary name; failures only warn."""
        if not self.writable:
            return
        tensors, info = stats.to_tensors()
        metadata = {"format": FORMAT, "version": str(VERSION), "key": self.key, "layer": str(stats.layer), "info": json.dumps(info)}
        data = save_tensors(tensors, metadata)
        path = self.path(stats.layer)
        tmp = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.directory)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            self.writable = False
            warnings.warn(
                f"cannot write the statistics cache in {self.directory} ({exc.strerror or exc}); "
                "continuing without it (set GRAPE_CACHE to a writable folder to keep statistics)",
                GrapeWarning,
                stacklevel=2,
            )

    def _remove_stale_temporaries(self) -> None:
        if not self.directory.is_dir():
            return
        now = time.time()
        for tmp in self.directory.glob(".layer_*.tmp"):
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink()
            except OSError:
                pass  # another run removed it, or we may not: either way not ours to worry about
