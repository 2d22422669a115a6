"""Write pruned checkpoints atomically and load them back.

A checkpoint is streamed layer by layer (:mod:`grape.shards`) into the temporary directory of
an output claimed with :func:`grape.output_guard.claim_output`, which renames it into place at
the end (:func:`grape.pipeline.run_pipeline` does both): an interrupted run leaves no
half-written output, and peak memory is one decoder layer. Layout (the contract in DESIGN.md):

- ``config.json``: the original architecture plus ``grape_experts_per_layer`` (one entry per
  decoder layer, None for dense layers) and ``grape_moe_layout``; the scalar expert count is
  set to the largest layer's count (never below an MTP layer's, :mod:`grape.quant.mtp`),
  ``auto_map`` points at ``modeling_grape.py``, and a quantized source's
  ``quantization_config`` is copied verbatim.
- ``modeling_grape.py``: a copy of :mod:`grape_kernels.ragged_modeling` plus a ``*ForCausalLM``
  subclass, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works
  without grape installed.
- safetensors shards holding only the kept experts, in the model's native (fused) tensor
  names, or for a quantized source in its release layout and format (:mod:`grape.layer_writer`),
  plus the tokenizer files, ``grape_report.json`` and ``experts_per_layer.png``.
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from grape.checkpoint_files import TOKENIZER_FILES, load_config, read_layout
from grape.layer_writer import ExpertEdit, QuantizationLog, layer_tensors
from grape.model_io import LazyCausalLM
from grape.quant.mtp import is_mtp_tensor, scalar_expert_count
from grape.shards import ShardWriter, header_bound
from grape_kernels import ragged_modeling
from grape_kernels.ragged_modeling import GRAPE_COUNTS_KEY, GRAPE_LAYOUT_KEY, make_ragged_class

__all__ = ["WrittenCheckpoint", "write_checkpoint", "estimated_bytes", "expert_counts", "load_pruned"]



def expert_counts(model: nn.Module, lazy: LazyCausalLM) -> list[int | None]:
    """Routed experts per decoder layer of a (skeleton) model; None for dense layers."""
    counts = []
    for layer in lazy.adapter.decoder_layers(model):
        block = lazy.adapter.moe_block(layer)
        counts.append(None if block is None else int(block.experts.num_experts))
    return counts


def estimated_bytes(lazy: LazyCausalLM, *, kept_expert_fraction: float = 1.0) -> int:
    """About how many bytes the output checkpoint will take, from the input's headers.

    Routed-expert tensors shrink with the fraction of experts kept; everything else is copied.
    Used to refuse an output location without enough free space before any heavy work.
    """
    total = routed = 0
    for entry in lazy.index.entries.values():
        total += entry.nbytes
        routed += entry.nbytes if entry.routed else 0
    small_files = sum((lazy.model_dir / name).stat().st_size for name in TOKENIZER_FILES if (lazy.model_dir / name).is_file())
    return int(total - routed * (1.0 - kept_expert_fraction)) + small_files + (256 << 10)  # + config, report, plot


@dataclass(frozen=True)
class WrittenCheckpoint:
    """What :func:`write_checkpoint` wrote: the weight files, and for a quantized source how
    its tensors were written (:class:`grape.layer_writer.QuantizationLog`, for the report)."""

    files: list[str]
    quantization: dict | None


def write_checkpoint(
    lazy: LazyCausalLM,
    directory: Path,
    *,
    transform_layer: Callable[[int, nn.Module], None] | None = None,
    expert_edit: Callable[[int], ExpertEdit | None] | None = None,
) -> WrittenCheckpoint:
    """Stream ``lazy`` into ``directory``, calling ``transform_layer(i, layer)`` on each
    materialised decoder layer first.

    ``expert_edit(i)`` says what the command does to layer ``i``'s routed experts
    (:class:`~grape.layer_writer.ExpertEdit`; None: anything). When it changes no expert weight
    (drop mode), the routed experts are not materialised: the transform sees them on the meta
    device (and slices the router), and the kept experts are streamed from the source one at a
    time. A quantized source keeps its format (:mod:`grape.layer_writer`). DeepSeek's MTP layers
    (``num_nextn_predict_layers``) are copied byte for byte (:mod:`grape.quant.mtp`).

    ``directory`` is a claimed output's temporary directory (:mod:`grape.output_guard`); the
    caller adds the report and commits. Memory: one decoder layer at most (:mod:`grape.shards`
    writes each tensor as it comes). Writes weights, ``config.json``, ``modeling_grape.py`` and
    the tokenizer files.
    """
    index, adapter = lazy.index, lazy.adapter
    quantized = index.format.is_quantized
    log = QuantizationLog(index.format.method) if quantized else None
    tied = bool(getattr(lazy.config, "tie_word_embeddings", False))
    names = [(n, p.shape) for n, p in lazy.model.named_parameters()] + [(n, b.shape) for n, b in lazy.model.named_buffers()]
    names += [(n, e.shape) for n, e in index.entries.items()]
    writer = ShardWriter(directory, lazy.checkpoint_dtype, header_bytes=header_bound(names))
    try:
        for name, _ in lazy.model.named_parameters():
            if name.startswith("model.layers.") or (tied and name == "lm_head.weight"):
                continue
            value = index.load(name)
            writer.add(name, value, dtype=value.dtype if quantized else None)
        for i in range(lazy.num_layers):
            edit = expert_edit(i) if expert_edit is not None else None
            experts_name = lazy.experts_name(i)
            materialise = experts_name is None or edit is None or edit.needs_weights
            with lazy.materialized_layer(i, routed_experts=materialise) as layer:
                if transform_layer is not None:
                    transform_layer(i, layer)
                router = f"{adapter.block_attr}.{adapter.router_attr}" if experts_name else None
                pending = layer_tensors(
                    index, lazy.layer_prefix(i), layer, experts_name, router, edit,
                    checkpoint_dtype=lazy.checkpoint_dtype, log=log,
                )  # fmt: skip
                for tensor in sorted(pending, key=lambda t: -t.dtype.itemsize):  # widest first: aligned
                    writer.add_stream(tensor.name, tensor.dtype, tensor.shape, tensor.chunks())
        for key in sorted(k for k in index.entries if is_mtp_tensor(k, lazy.config)):
            value = index.get(key)
            writer.add(key, value, dtype=value.dtype)
        weight_files = writer.finish()
    finally:
        writer.close()
    _write_config(lazy, directory, expert_counts(lazy.model, lazy))
    _write_modeling_file(lazy, directory)
    _copy_tokenizer_files(lazy.model_dir, directory)
    return WrittenCheckpoint(weight_files, log.to_json() if log is not None else None)


def _write_config(lazy: LazyCausalLM, directory: Path, counts: list[int | None]) -> None:
    config = copy.deepcopy(lazy.config)
    adapter = lazy.adapter
    setattr(config, GRAPE_COUNTS_KEY, counts)
    setattr(config, GRAPE_LAYOUT_KEY, {"block_attr": adapter.block_attr, "router_attr": adapter.router_attr})
    # a config may declare MTP layers its checkpoint does not hold (transformers' DeepSeek default)
    has_mtp = any(is_mtp_tensor(key, lazy.config) for key in lazy.index.entries)
    largest = max(c for c in counts if c is not None)
    scalar = scalar_expert_count(counts, adapter.num_experts(lazy.config), lazy.config) if has_mtp else largest
    setattr(config, adapter.count_key, scalar)
    if adapter.per_layer_config:
        _write_per_layer_config(config, adapter.count_key, counts, scalar)
    base = type(lazy.model).__name__
    config.auto_map = {"AutoModelForCausalLM": f"modeling_grape.Grape{base}"}
    config.dtype = lazy.checkpoint_dtype
    if lazy.format.is_quantized:  # verbatim: the output stores the source's format
        config.quantization_config = dict(lazy.format.config)
    config.save_pretrained(directory)


def _write_per_layer_config(config, count_key: str, counts: list[int | None], scalar: int) -> None:
    """The counts again in transformers' heterogeneous-config form (``per_layer_config``, 5.24+).

    transformers' MoE classes do not read it yet; writing it keeps grape checkpoints loadable as
    they adopt it. Measured: grape's loader, transformers with remote code and the vLLM plugin
    give the same outputs with it. ``allow_global_per_layer_attribute_access`` lets code that
    reads the scalar count (transformers' own ``__init__``, vLLM) get the maximum instead of an
    error; layers at the scalar count (the maximum, or an MTP layer's count) need no entry.
    Other attributes a source varies are kept.
    """
    overrides = {int(i): dict(v) for i, v in (config.to_dict().get("per_layer_config") or {}).items()}
    for i, count in enumerate(counts):
        overrides.setdefault(i, {}).pop(count_key, None)
        if count is not None and count != scalar:
            overrides[i][count_key] = count
    overrides = {i: v for i, v in overrides.items() if v}
    if overrides or hasattr(config, "per_layer_config"):
        config.allow_global_per_layer_attribute_access = True
        config.per_layer_config = overrides


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
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)


def load_pruned(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a grape checkpoint (ragged or not) without executing code from the checkpoint.

    Builds the ragged subclass of the architecture's ``*ForCausalLM`` from grape's own copy of
    the modeling code; keyword arguments go to ``from_pretrained`` (dtype, device_map,
    experts_implementation, ...). The per-layer expert counts of the config are checked against
    the weights' headers first, so a corrupt checkpoint is one clear error, not a shape
    mismatch deep inside transformers.
    """
    from transformers import AutoModelForCausalLM

    read_layout(path)  # config and weights agree (per-layer counts, shards), from the headers alone
    config = load_config(Path(path))
    if hasattr(config, "auto_map"):
        del config.auto_map
    base = AutoModelForCausalLM._model_mapping[type(config)]
    return make_ragged_class(base).from_pretrained(path, config=config, **kwargs)
