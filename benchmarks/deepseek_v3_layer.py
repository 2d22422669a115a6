"""Build ONE full-width DeepSeek-V3 MoE decoder layer as a checkpoint in the FP8 release layout.

The memory benchmarks prune it on a 24 GB machine: 256 routed experts of 2048 x 7168 (top-8,
8 groups / top-4 groups, sigmoid scores + correction bias, one shared expert) and DeepSeek's
MLA attention, every linear F8_E4M3 with an F32 ``weight_scale_inv`` per 128 x 128 block and
every per-expert tensor under its release name (``model.layers.0.mlp.experts.J.gate_proj.weight``
...), about 11.7 GB. ``config.json`` is DeepSeek-V3's published configuration with one decoder
layer, no dense layers (``first_k_dense_replace: 0``), no MTP layer and a small vocabulary
(``--vocab``, so that embeddings do not dominate); transformers reads it as a 1-layer
DeepSeek-V3. The tensor names and shapes come from transformers' own module tree for that
config (built on the meta device), so config and weights cannot disagree at any width.

Weights are random: ``N(0, 1) * 64`` cast to E4M3 with block scales ``0.02 / 64`` varied by
+-25 %, i.e. real weights of about N(0, 0.02), the magnitude of the release. The layer is written
tensor by tensor straight into safetensors shards (the header is computed first from the
planned shapes), so building it needs memory for one tensor, not one layer. Disk space is
checked before anything is written, and the output appears atomically (temporary sibling,
then rename).

Example (delete it when done)::

    python benchmarks/deepseek_v3_layer.py /work/big/deepseek-v3-layer
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BLOCK = (128, 128)
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(BLOCK)}
SHARD_BYTES = 4 * 1024**3
WEIGHT_STD = 0.02
_CODE_SCALE = 64.0  # values are N(0, 1) * 64 before the cast: E4M3 codes well inside +-448
_DTYPES = {"BF16": (torch.bfloat16, 2), "F32": (torch.float32, 4), "F8_E4M3": (torch.float8_e4m3fn, 1)}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype][1]


def layer_config(vocab_size: int = 4096, **overrides):
    """DeepSeek-V3's published configuration as one MoE decoder layer (``overrides`` shrink it for tests)."""
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        vocab_size=vocab_size, num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0,
        max_position_embeddings=4096, **overrides,
    )
    config.dtype = torch.bfloat16
    config.architectures = ["DeepseekV3ForCausalLM"]
    config.quantization_config = dict(QUANTIZATION_CONFIG)
    return config


def _is_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """The release quantizes every 2-D linear weight except embeddings, head, norms and the router."""
    excluded = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight")
    return len(shape) == 2 and name.endswith(".weight") and not any(part in name for part in excluded)


def planned_tensors(config) -> list[PlannedTensor]:
    """Every tensor of the checkpoint, in release names and dtypes, from transformers' module tree."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    found = list(model.named_parameters()) + [
        (name, buf) for name, buf in model.named_buffers() if "e_score_correction_bias" in name
    ]
    plan = []
    for name, value in found:
        prefix, _, leaf = name.rpartition(".experts.")
        if prefix and leaf in ("gate_up_proj", "down_proj"):  # fused in transformers, one per expert in the release
            parts = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
            rows = value.shape[1] // len(parts)
            for expert in range(value.shape[0]):
                for part in parts:
                    plan.append(PlannedTensor(f"{prefix}.experts.{expert}.{part}.weight", "BF16", (rows, value.shape[2])))
        elif "e_score_correction_bias" in name or name.endswith("mlp.gate.weight"):
            plan.append(PlannedTensor(name, "F32" if "bias" in name else "BF16", tuple(value.shape)))
        else:
            plan.append(PlannedTensor(name, "BF16", tuple(value.shape)))
    stored = []
    for tensor in plan:
        if _is_quantized(tensor.name, tensor.shape):
            grid = tuple(-(-n // b) for n, b in zip(tensor.shape, BLOCK))
            stored += [PlannedTensor(tensor.name, "F8_E4M3", tensor.shape), PlannedTensor(f"{tensor.name}_scale_inv", "F32", grid)]
        else:
            stored.append(tensor)
    return stored


def _make_tensor(tensor: PlannedTensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if tensor.name.endswith("_scale_inv"):
        jitter = 1.0 + 0.5 * (torch.rand(tensor.shape, generator=generator) - 0.5)
        return (WEIGHT_STD / _CODE_SCALE) * jitter
    if "norm" in tensor.name:
        return torch.ones(tensor.shape, dtype=_DTYPES[tensor.dtype][0])
    if "e_score_correction_bias" in tensor.name:
        return torch.rand(tensor.shape, generator=generator) * 0.1
    values = torch.randn(tensor.shape, generator=generator)
    if tensor.dtype == "F8_E4M3":
        return values.mul_(_CODE_SCALE).to(torch.float8_e4m3fn)
    return values.mul_(WEIGHT_STD).to(_DTYPES[tensor.dtype][0])


def _shards(plan: list[PlannedTensor], shard_bytes: int) -> list[list[PlannedTensor]]:
    shards, current, size = [], [], 0
    for tensor in plan:
        if current and size + tensor.nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    return shards + [current]


def _write_shard(path: Path, tensors: list[PlannedTensor], first_seed: int) -> None:
    """A safetensors file written one tensor at a time: header from the plan, then each tensor's bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for index, tensor in enumerate(tensors):
            value = _make_tensor(tensor, first_seed + index)
            handle.write(value.contiguous().view(torch.uint8).numpy().tobytes())


def build(out_dir: Path, config, *, seed: int = 0, shard_bytes: int = SHARD_BYTES, progress: bool = False) -> int:
    """Write the checkpoint into ``out_dir`` (must not exist); returns its weight bytes."""
    plan = planned_tensors(config)
    total = sum(t.nbytes for t in plan)
    tmp = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    tmp.mkdir()
    try:
        shards = _shards(plan, shard_bytes)
        weight_map, seed_offset = {}, seed
        for number, tensors in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            started = time.perf_counter()
            _write_shard(tmp / name, tensors, seed_offset)
            seed_offset += len(tensors)
            weight_map.update(dict.fromkeys((t.name for t in tensors), name))
            if progress:
                gb = sum(t.nbytes for t in tensors) / 1e9
                print(f"{name}: {len(tensors)} tensors, {gb:.2f} GB in {time.perf_counter() - started:.0f} s", flush=True)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory (must not exist; put it outside the repo)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size (the release has 129280)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out.exists():
        print(f"error: {out} exists; choose a new directory", file=sys.stderr)
        return 2
    if not out.parent.is_dir():
        print(f"error: parent directory {out.parent} does not exist", file=sys.stderr)
        return 2
    config = layer_config(args.vocab)
    needed = sum(t.nbytes for t in planned_tensors(config))
    free = shutil.disk_usage(out.parent).free
    if free < needed * 1.05:
        print(f"error: {out.parent} has {free / 1e9:.1f} GB free; the layer needs {needed / 1e9:.1f} GB", file=sys.stderr)
        return 2
    print(f"writing {needed / 1e9:.2f} GB into {out}", flush=True)
    started = time.perf_counter()
    build(out, config, seed=args.seed, progress=True)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
