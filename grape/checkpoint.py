"""Write pruned checkpoints atomically and load them back.

A checkpoint is written layer by layer into a temporary sibling of the output directory and
renamed into place at the end: an interrupted run leaves no half-written output, and peak
memory is one decoder layer. Layout (the contract in DESIGN.md):

- ``config.json``: the original architecture plus ``grape_experts_per_layer`` (one entry per
  decoder layer, None for dense layers) and ``grape_moe_layout``; the scalar expert count is
  set to the largest layer's count, and ``auto_map`` points at ``modeling_grape.py``.
- ``modeling_grape.py``: a copy of :mod:`grape_kernels.ragged_modeling` plus a ``*ForCausalLM``
  subclass, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works
  without grape installed.
- safetensors shards holding only the kept experts, in the model's native (fused) tensor
  names, plus the tokenizer files, ``grape_report.json`` and ``experts_per_layer.png``.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from grape.model_io import LazyCausalLM
from grape.report import plot_experts_per_layer, write_json_atomic
from grape_kernels import ragged_modeling
from grape_kernels.ragged_modeling import GRAPE_COUNTS_KEY, GRAPE_LAYOUT_KEY, make_ragged_class

__all__ = [
    "OutputExistsError",
    "check_output_dir",
    "write_checkpoint",
    "expert_counts",
    "load_pruned",
]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
MAX_SHARD_BYTES = 2 * 1024**3


class OutputExistsError(FileExistsError):
    """The output directory exists and ``--overwrite`` was not given."""


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool, source: Path | None = None) -> Path:
    """Validate the output location before any heavy work starts."""
    out = Path(out_dir).resolve()
    if source is not None and out == Path(source).resolve():
        raise OutputExistsError(f"output directory {out} is the input model: grape never modifies its input")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise FileNotFoundError(f"parent directory of the output {out.parent} does not exist")
    return out


def expert_counts(model: nn.Module, lazy: LazyCausalLM) -> list[int | None]:
    """Routed experts per decoder layer of a (skeleton) model; None for dense layers."""
    counts = []
    for layer in lazy.adapter.decoder_layers(model):
        block = lazy.adapter.moe_block(layer)
        counts.append(None if block is None else int(block.experts.num_experts))
    return counts


class _ShardWriter:
    """Accumulates tensors and writes safetensors shards of bounded size."""

    def __init__(self, directory: Path, dtype: torch.dtype, max_bytes: int = MAX_SHARD_BYTES):
        self.directory = directory
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = tensor.contiguous().clone()
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self.directory / f"shard-{len(self.shards):05d}.safetensors"), {"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self.directory / "shard-00000.safetensors", self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f"shard-{i:05d}.safetensors", self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(
    lazy: LazyCausalLM,
    out_dir: Path,
    *,
    transform_layer: Callable[[int, nn.Module], None] | None,
    report: dict,
    overwrite: bool = False,
    plot_title: str = "routed experts per layer",
) -> Path:
    """Stream ``lazy`` to ``out_dir``, calling ``transform_layer(i, layer)`` on each materialised layer."""
    out_dir = check_output_dir(out_dir, overwrite=overwrite, source=lazy.model_dir)
    counts_before = expert_counts(lazy.model, lazy)
    tmp = out_dir.parent / f".{out_dir.name}.grape-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, lazy.checkpoint_dtype)
        tied = bool(getattr(lazy.config, "tie_word_embeddings", False))
        for name, _ in lazy.model.named_parameters():
            if name.startswith("model.layers.") or (tied and name == "lm_head.weight"):
                continue
            writer.add(name, lazy.index.load(name))
        for index in range(lazy.num_layers):
            with lazy.materialized_layer(index) as layer:
                if transform_layer is not None:
                    transform_layer(index, layer)
                for name, tensor in layer.state_dict().items():
                    writer.add(f"{lazy.layer_prefix(index)}.{name}", tensor)
        writer.finish()
        counts_after = expert_counts(lazy.model, lazy)
        _write_config(lazy, tmp, counts_after)
        _write_modeling_file(lazy, tmp)
        _copy_tokenizer_files(lazy.model_dir, tmp)
        report = dict(report)
        report.setdefault("experts_per_layer_before", counts_before)
        report["experts_per_layer"] = counts_after
        write_json_atomic(report, tmp / "grape_report.json")
        plot_experts_per_layer(counts_before, counts_after, tmp / "experts_per_layer.png", plot_title)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_config(lazy: LazyCausalLM, directory: Path, counts: list[int | None]) -> None:
    config = copy.deepcopy(lazy.config)
    adapter = lazy.adapter
    moe_counts = [c for c in counts if c is not None]
    setattr(config, GRAPE_COUNTS_KEY, counts)
    setattr(config, GRAPE_LAYOUT_KEY, {"block_attr": adapter.block_attr, "router_attr": adapter.router_attr})
    setattr(config, adapter.count_key, max(moe_counts))
    base = type(lazy.model).__name__
    config.auto_map = {"AutoModelForCausalLM": f"modeling_grape.Grape{base}"}
    config.dtype = lazy.checkpoint_dtype
    config.save_pretrained(directory)


def _write_modeling_file(lazy: LazyCausalLM, directory: Path) -> None:
    base = type(lazy.model)
    source = inspect.getsource(ragged_modeling)
    footer = (
        f"\n\nfrom {base.__module__} import {base.__name__} as _Base  # noqa: E402\n\n\n"
        f"class Grape{base.__name__}(_Base):\n"
        f'    """{base.__name__} whose MoE layers keep per-layer expert counts (written by grape)."""\n\n'
        f"    def __init__(self, config, *args, **kwargs):\n"
        f"        super().__init__(config, *args, **kwargs)\n"
        f"        apply_ragged_experts(self)\n"
    )
    (directory / "modeling_grape.py").write_text(source + footer)


def _copy_tokenizer_files(source: Path, directory: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move ``tmp`` to ``out_dir``; an existing ``out_dir`` (``--overwrite``) is removed only after."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.grape-old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def load_pruned(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a grape checkpoint (ragged or not) without executing code from the checkpoint.

    Builds the ragged subclass of the architecture's ``*ForCausalLM`` from grape's own copy of
    the modeling code; keyword arguments go to ``from_pretrained`` (dtype, device_map,
    experts_implementation, ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "auto_map"):
        del config.auto_map
    base = AutoModelForCausalLM._model_mapping[type(config)]
    return make_ragged_class(base).from_pretrained(path, config=config, **kwargs)
