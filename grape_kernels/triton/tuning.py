"""Block sizes of the grouped-GEMM kernels: a JSON table plus a loader.

Why a table keyed like this. A ragged model has a different ``E`` in every layer, but the
GEMM tile shape that runs fastest depends on the matrix shape and on how many rows each
expert's tile sees, not on how many experts there are. So the table is keyed by the layer's
gate_up projection ``(N, K) = (2*I, H)`` (the down projection's shape follows from it) and,
inside, by *tokens per expert* ``T*k/E`` buckets; ``E`` never appears, and one table entry
serves every layer of the model. Lookups take the bucket nearest in log scale.

One config drives both GEMMs of a layer because they must share ``BLOCK_M``: the token order
from ``align_block_size`` is padded to it. ``BLOCK_N`` is the number of *weight* columns per
tile for both kernels (the gate_up kernel turns ``BLOCK_N`` gate/up columns into
``BLOCK_N / 2`` activation columns), so a config's shared-memory footprint reads the same way.

Table format (``grape-triton-moe/1``)::

    {
      "format": "grape-triton-moe/1",
      "device": "NVIDIA H100 80GB HBM3",          # where it was measured (informational)
      "note": "...",
      "default": {"1": CONFIG, "16": CONFIG, ...},  # used for shapes not listed below
      "shapes": {"N=4096,K=2048": {"1": CONFIG, ...}, ...}
    }
    CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
              "num_warps": 4, "num_stages": 4}

The shipped ``grape_kernels/tuning/default.json`` holds *heuristic, unmeasured* defaults
(no GPU was available where it was written). ``benchmarks/tune_triton.py`` measures a table on
a real GPU; point ``GRAPE_TRITON_TUNING`` at it (or call :func:`set_table`) to use it.
Whatever the table says, a config is shrunk to the device's shared memory before launch.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "TABLE_FORMAT",
    "TUNING_ENV_VAR",
    "DEFAULT_TABLE_PATH",
    "KernelConfig",
    "TuningTable",
    "shape_key",
    "active_table",
    "set_table",
    "fit_shared_memory",
    "select_config",
]

TABLE_FORMAT = "grape-triton-moe/1"
TUNING_ENV_VAR = "GRAPE_TRITON_TUNING"
DEFAULT_TABLE_PATH = Path(__file__).resolve().parent.parent / "tuning" / "default.json"

_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters shared by the gate_up and down grouped GEMMs of one layer call.

    ``block_m``/``block_n``/``block_k`` must be powers of two >= 16 (``tl.dot`` minimum);
    ``block_n`` counts weight columns (see module doc).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or not _is_pow2(value):
                raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")
        if not isinstance(self.group_m, int) or self.group_m < 1:
            raise ValueError(f"group_m must be a positive int, got {self.group_m!r}")
        if not isinstance(self.num_warps, int) or not _is_pow2(self.num_warps) or self.num_warps > 16:
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be a positive int, got {self.num_stages!r}")

    @classmethod
    def from_dict(cls, entry: dict) -> KernelConfig:
        """Parse the JSON form (``BLOCK_M`` ... ``num_stages``); unknown keys are an error."""
        if not isinstance(entry, dict) or set(entry) != set(_CONFIG_KEYS):
            raise ValueError(f"a kernel config needs exactly the keys {_CONFIG_KEYS}, got {entry!r}")
        return cls(*(entry[key] for key in _CONFIG_KEYS))

    def to_dict(self) -> dict[str, int]:
        """The JSON form, inverse of :meth:`from_dict`."""
        values = (self.block_m, self.block_n, self.block_k, self.group_m, self.num_warps, self.num_stages)
        return dict(zip(_CONFIG_KEYS, values))

    def shared_memory_bytes(self, element_size: int) -> int:
        """Software-pipelined A and B tiles held in shared memory (the dominant term)."""
        return self.num_stages * (self.block_m * self.block_k + self.block_k * self.block_n) * element_size


def shape_key(n: int, k: int) -> str:
    """Table key of a layer whose gate_up projection is ``N = 2*I`` by ``K = H``."""
    return f"N={n},K={k}"


def _parse_buckets(where: str, buckets: object) -> dict[float, KernelConfig]:
    if not isinstance(buckets, dict) or not buckets:
        raise ValueError(f"{where}: expected a non-empty {{tokens_per_expert: config}} object")
    parsed = {}
    for key, entry in buckets.items():
        try:
            bucket = float(key)
        except ValueError:
            raise ValueError(f"{where}: bucket key {key!r} is not a number") from None
        if not bucket > 0:
            raise ValueError(f"{where}: bucket key {key!r} must be positive")
        try:
            parsed[bucket] = KernelConfig.from_dict(entry)
        except ValueError as err:
            raise ValueError(f"{where}[{key!r}]: {err}") from None
    return parsed


def _bucket_label(bucket: float) -> str:
    return str(int(bucket)) if bucket == int(bucket) else repr(bucket)


@dataclass(frozen=True)
class TuningTable:
    """A parsed table: default buckets plus per-``(N, K)`` buckets."""

    default: dict[float, KernelConfig]
    shapes: dict[tuple[int, int], dict[float, KernelConfig]]
    device: str = "unknown"
    note: str = ""

    @classmethod
    def from_json(cls, obj: object, source: str = "<table>") -> TuningTable:
        """Parse and validate the JSON object; errors name ``source`` and the bad entry."""
        if not isinstance(obj, dict) or obj.get("format") != TABLE_FORMAT:
            raise ValueError(f"{source}: not a {TABLE_FORMAT} tuning table")
        default = _parse_buckets(f"{source}: default", obj.get("default"))
        shapes = {}
        for key, buckets in (obj.get("shapes") or {}).items():
            try:
                n_part, k_part = key.split(",")
                if not (n_part.startswith("N=") and k_part.startswith("K=")):
                    raise ValueError
                n, k = int(n_part[2:]), int(k_part[2:])
            except ValueError:
                raise ValueError(f"{source}: shape key {key!r} is not of the form 'N=<int>,K=<int>'") from None
            shapes[(n, k)] = _parse_buckets(f"{source}: shapes[{key!r}]", buckets)
        return cls(default, shapes, str(obj.get("device", "unknown")), str(obj.get("note", "")))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TuningTable:
        """Read a table file."""
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read tuning table {path}: {err}") from None
        return cls.from_json(obj, str(path))

    def to_json(self) -> dict:
        """The JSON object, inverse of :meth:`from_json`."""

        def dump(buckets: dict[float, KernelConfig]) -> dict:
            return {_bucket_label(b): buckets[b].to_dict() for b in sorted(buckets)}

        return {
            "format": TABLE_FORMAT,
            "device": self.device,
            "note": self.note,
            "default": dump(self.default),
            "shapes": {shape_key(n, k): dump(b) for (n, k), b in sorted(self.shapes.items())},
        }

    def lookup(self, n: int, k: int, tokens_per_expert: float) -> KernelConfig:
        """Config of the bucket nearest (log scale) to ``tokens_per_expert`` for shape (N, K)."""
        buckets = self.shapes.get((n, k), self.default)
        target = math.log2(max(tokens_per_expert, 1e-6))
        nearest = min(buckets, key=lambda bucket: (abs(math.log2(bucket) - target), bucket))
        return buckets[nearest]


_override: TuningTable | None = None


@functools.cache
def _load_cached(path: str) -> TuningTable:
    return TuningTable.load(path)


def active_table() -> TuningTable:
    """The table in use: :func:`set_table`'s, else ``$GRAPE_TRITON_TUNING``, else the shipped one."""
    if _override is not None:
        return _override
    return _load_cached(os.environ.get(TUNING_ENV_VAR) or str(DEFAULT_TABLE_PATH))


def set_table(table: TuningTable | str | os.PathLike | None) -> None:
    """Use ``table`` (a table or a path) for every later launch; ``None`` restores the default."""
    global _override
    _override = TuningTable.load(table) if isinstance(table, (str, os.PathLike)) else table


def fit_shared_memory(config: KernelConfig, element_size: int, budget: int) -> KernelConfig:
    """Shrink ``config`` until its pipelined tiles fit ``budget`` bytes of shared memory.

    A table measured on an H100 (227 KiB per block) may name configs that cannot launch on a
    smaller GPU or with fp32 inputs; rather than fail, drop pipeline stages first (cheapest
    in speed), then halve BLOCK_K, then BLOCK_N, then BLOCK_M.
    """
    fields = config.to_dict()
    while KernelConfig.from_dict(fields).shared_memory_bytes(element_size) > budget:
        if fields["num_stages"] > 2:
            fields["num_stages"] -= 1
        elif fields["BLOCK_K"] > 16:
            fields["BLOCK_K"] //= 2
        elif fields["BLOCK_N"] > 16:
            fields["BLOCK_N"] //= 2
        elif fields["BLOCK_M"] > 16:
            fields["BLOCK_M"] //= 2
        else:
            break
    return KernelConfig.from_dict(fields)


@functools.cache
def _device_shared_memory(index: int) -> int:
    import triton

    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def select_config(
    n: int, k: int, tokens_per_expert: float, element_size: int, device: torch.device
) -> KernelConfig:
    """The config for a layer call: table lookup, then fitted to the device's shared memory.

    Under ``TRITON_INTERPRET=1`` (CPU) there is no shared-memory limit to respect.
    """
    config = active_table().lookup(n, k, tokens_per_expert)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return config
    index = device.index if device.index is not None else torch.cuda.current_device()
    return fit_shared_memory(config, element_size, _device_shared_memory(index))
