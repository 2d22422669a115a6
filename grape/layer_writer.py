"""What one decoder layer becomes in the output: which tensors, under which names, in which format.

The checkpoint writer (:mod:`grape.checkpoint`) asks this module for a layer's tensors as a list
of :class:`PendingTensor`: a name, a dtype, a shape and a function that yields the bytes in
chunks when the tensor is written, so at most one tensor (or one expert of a fused tensor) is
built at a time. What a command did to the layer's routed experts is an :class:`ExpertEdit`.

Unquantized sources are written as they are in memory: transformers' module names, the fused
3-D expert tensors, the checkpoint dtype. When the command changed no expert weight (drop mode),
the routed experts are not materialised at all: the kept experts are streamed from the source one
expert at a time, so a layer larger than memory is written in the memory of one expert.

Quantized sources keep their release layout and format (:mod:`grape.quant.layout`):

- every tensor outside the routed experts and the router is copied byte for byte (no command
  that accepts a quantized source changes them);
- router tensors are written from the (sliced) module in their stored dtype; a router stored
  quantized would be re-quantized (no release stores it so);
- a kept, unchanged expert's tensors are copied byte for byte (FP8 ``experts.J.*`` renumbered,
  MXFP4 ``*_blocks``/``*_scales`` rows sliced);
- a changed expert (a merge target) is re-quantized in the source's scheme, and the relative
  error of each re-quantized tensor is recorded (:class:`QuantizationLog`, in the report);
- zeroed weights (sparsity) are set to the exact zero code with the scales kept: error 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from grape.checkpoint_files import PER_EXPERT_PARTS, CheckpointIndex
from grape.quant import fp8, mxfp4
from grape.quant.formats import MXFP4
from grape.quant.layout import quantized_tensors
from grape.tensor_io import TORCH_DTYPES

__all__ = ["ExpertEdit", "PendingTensor", "QuantizationLog", "layer_tensors"]


@dataclass(frozen=True)
class ExpertEdit:
    """What a command does to one layer's routed experts, as far as writing is concerned.

    Attributes:
        kept: the source index of every output expert, ascending.
        changed: output positions whose weights the command changed (merge targets); they are
            written from the materialised module (re-quantized for a quantized source).
        zeroed: the command only zeroes weights of every expert (sparsity).
    """

    kept: tuple[int, ...]
    changed: frozenset[int] = frozenset()
    zeroed: bool = False

    @property
    def needs_weights(self) -> bool:
        """Whether the layer's routed experts must be materialised (in memory) to be written."""
        return bool(self.changed) or self.zeroed


@dataclass(frozen=True)
class PendingTensor:
    """A tensor the writer will write: ``chunks()`` yields its bytes along dim 0 when asked."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]


@dataclass
class QuantizationLog:
    """How a quantized source's tensors were written (the report's ``quantization`` section)."""

    method: str
    errors: dict[str, float] = field(default_factory=dict)
    zeroed: bool = False

    def to_json(self) -> dict:
        summary = {
            "format": self.method,
            "unchanged_tensors": "copied byte for byte (kept experts renumbered; routers sliced in their stored dtype)",
        }
        if self.zeroed:
            summary["pruned_weights"] = "set to the exact zero code with the block scales kept: quantization error 0"
        if self.errors:
            errors = list(self.errors.values())
            summary["requantized"] = {
                "tensors": len(errors),
                "max_relative_error": max(errors),
                "mean_relative_error": sum(errors) / len(errors),
                "measure": "||W - deq(quant(W))||_F / ||W||_F, W the unquantized result (e.g. the merged expert)",
                "per_tensor": dict(sorted(self.errors.items())),
            }
        return summary


def _ready(name: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> PendingTensor:
    value = value.detach()
    dtype = dtype or value.dtype
    return PendingTensor(name, dtype, tuple(value.shape), lambda: [value.to(dtype)])


def _copy(index: CheckpointIndex, key: str, name: str | None = None) -> PendingTensor:
    entry = index.entries[key]
    return PendingTensor(name or key, TORCH_DTYPES[entry.dtype], entry.shape, lambda: [index.get(key)])


def layer_tensors(
    index: CheckpointIndex,
    prefix: str,
    layer: nn.Module,
    experts_name: str | None,
    router_name: str | None,
    edit: ExpertEdit | None,
    *,
    checkpoint_dtype: torch.dtype,
    log: QuantizationLog | None,
) -> list[PendingTensor]:
    """The output tensors of the decoder layer ``layer`` (checkpoint prefix ``prefix``).

    ``experts_name``/``router_name`` locate the routed experts and the router inside the layer
    (None for a dense layer). With ``edit=None`` every expert may have changed and is written
    from the module. The routed experts must be materialised iff ``edit`` needs weights (or is
    None); otherwise they are streamed from the source.
    """
    state = {f"{prefix}.{name}": value for name, value in layer.state_dict().items()}
    experts_prefix = f"{prefix}.{experts_name}" if experts_name else None
    if not index.format.is_quantized:
        pending = [_ready(name, value, checkpoint_dtype if value.is_floating_point() else None)
                   for name, value in state.items() if experts_prefix is None or not name.startswith(f"{experts_prefix}.")]
        if experts_prefix is not None:
            module = layer.get_submodule(experts_name)
            pending += _float_experts(index, experts_prefix, module, edit, checkpoint_dtype)
        return pending
    router_prefix = f"{prefix}.{router_name}." if router_name else None
    pending = []
    for key in sorted(k for k, e in index.entries.items() if e.layer is not None and k.startswith(f"{prefix}.")):
        if experts_prefix is not None and key.startswith(f"{experts_prefix}."):
            continue
        if router_prefix is not None and key.startswith(router_prefix):
            pending += _router_tensor(index, key, state, log)
        else:
            pending.append(_copy(index, key))
    if experts_prefix is not None:
        module = layer.get_submodule(experts_name)
        pending += _quantized_experts(index, experts_prefix, module, edit, log)
    return pending


def _router_tensor(index: CheckpointIndex, key: str, state: dict, log: QuantizationLog) -> list[PendingTensor]:
    if key.endswith("_scale_inv"):
        return []  # written with its weight
    value = state[key]
    if not index.is_quantized(key):
        return [_ready(key, value, TORCH_DTYPES[index.entries[key].dtype])]
    return _requantized(index, key, key, value, log)


def _requantized(index: CheckpointIndex, source_key: str, name: str, value: torch.Tensor, log: QuantizationLog) -> list[PendingTensor]:
    scale = index.entries.get(f"{source_key}_scale_inv")
    scale_dtype = TORCH_DTYPES[scale.dtype] if scale is not None else torch.float32
    tensors, error = quantized_tensors(name, value.float(), index.format, scale_dtype=scale_dtype)
    log.errors[name] = error
    return [_ready(k, v) for k, v in tensors.items()]


# ---- unquantized experts ------------------------------------------------------------------------

def _float_experts(index: CheckpointIndex, prefix: str, module: nn.Module, edit: ExpertEdit | None, dtype: torch.dtype) -> list[PendingTensor]:
    pending = []
    for name, param in module.named_parameters(recurse=False):
        full = f"{prefix}.{name}"
        if edit is None or edit.needs_weights or param.dim() == 0 or param.shape[0] != len(edit.kept) or not param.is_meta:
            pending.append(_ready(full, param, dtype if param.is_floating_point() else None))
            continue

        def chunks(full=full, kept=edit.kept) -> Iterator[torch.Tensor]:
            for source in kept:  # one expert at a time: the layer is never whole in memory
                yield index.load(full, dtype, range(source, source + 1))

        pending.append(PendingTensor(full, dtype, tuple(param.shape), chunks))
    return pending


# ---- quantized experts --------------------------------------------------------------------------

def _expert_parts(index: CheckpointIndex, prefix: str, source: int, leaf: str) -> list[str]:
    """The per-expert tensor names that make up fused ``leaf`` of expert ``source`` (gate, up / down)."""
    for parts in PER_EXPERT_PARTS[leaf]:
        keys = [f"{prefix}.{source}.{part}.weight" for part in parts]
        if all(k in index for k in keys):
            return keys
    raise KeyError(f"{prefix}.{source}: no per-expert tensors for {leaf}")


def _quantized_experts(index: CheckpointIndex, prefix: str, module: nn.Module, edit: ExpertEdit | None, log: QuantizationLog) -> list[PendingTensor]:
    if edit is None:
        count = int(module.num_experts)
        edit = ExpertEdit(kept=tuple(range(count)), changed=frozenset(range(count)))
    if any(f"{prefix}.0.{parts[0]}.weight" in index for parts in PER_EXPERT_PARTS["down_proj"]):
        return _per_expert_quantized(index, prefix, module, edit, log)
    return _fused_quantized(index, prefix, module, edit, log)


def _per_expert_quantized(index: CheckpointIndex, prefix: str, module: nn.Module, edit: ExpertEdit, log: QuantizationLog) -> list[PendingTensor]:
    """FP8 releases: ``experts.J.{gate,up,down}_proj.weight`` (+ scale) per expert, renumbered 0..k-1."""
    pending = []
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    by_expert: dict[int, list[tuple[str, str]]] = {}
    for key in index.entries:
        match = pattern.match(key)
        if match:
            by_expert.setdefault(int(match.group(1)), []).append((key, match.group(2)))
    for out, source in enumerate(edit.kept):
        if out not in edit.changed and not edit.zeroed:
            for key, rest in sorted(by_expert[source], key=lambda item: item[1]):
                pending.append(_copy(index, key, f"{prefix}.{out}.{rest}"))
            continue
        for leaf in ("gate_up_proj", "down_proj"):
            value = getattr(module, leaf)[out]
            start = 0
            for key in _expert_parts(index, prefix, source, leaf):
                rows = index.entries[key].shape[0]
                piece = value[start : start + rows]
                start += rows
                name = key.replace(f"{prefix}.{source}.", f"{prefix}.{out}.", 1)
                pending += _changed_weight(index, key, name, piece, edit.zeroed, log)
    return pending


def _changed_weight(index: CheckpointIndex, key: str, name: str, value: torch.Tensor, zeroed: bool, log: QuantizationLog) -> list[PendingTensor]:
    """One expert weight the command changed: codes masked (sparsity) or the value re-quantized."""
    scale_key = f"{key}_scale_inv"
    if scale_key not in index:  # stored unquantized (modules_to_not_convert)
        return [_ready(name, value, TORCH_DTYPES[index.entries[key].dtype])]
    if zeroed:
        log.zeroed = True
        codes = fp8.mask_fp8(index.get(key), value != 0)
        return [_ready(name, codes), _copy(index, scale_key, f"{name}_scale_inv")]
    return _requantized(index, key, name, value, log)


def _fused_quantized(index: CheckpointIndex, prefix: str, module: nn.Module, edit: ExpertEdit, log: QuantizationLog) -> list[PendingTensor]:
    """GPT-OSS MXFP4: fused ``experts.P_blocks``/``P_scales`` (and float biases) with experts on dim 0."""
    if index.format.method != MXFP4:
        raise ValueError(f"{prefix}: fused quantized experts are read for MXFP4 only, not {index.format.method}")
    pending = []
    requantized: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for key in sorted(k for k in index.entries if k.startswith(f"{prefix}.") and "." not in k[len(prefix) + 1 :]):
        entry = index.entries[key]
        leaf = key[len(prefix) + 1 :]
        param = leaf.removesuffix("_blocks").removesuffix("_scales")
        shape = (len(edit.kept), *entry.shape[1:])
        if param == leaf:  # a float tensor (bias): from the module when it may have changed
            value = getattr(module, leaf)
            if not value.is_meta:
                pending.append(_ready(key, value, TORCH_DTYPES[entry.dtype]))
                continue

        def chunks(key=key, leaf=leaf, param=param) -> Iterator[torch.Tensor]:
            for out, source in enumerate(edit.kept):
                rows = index.get_rows(key, source, source + 1)
                if param != leaf and edit.zeroed and leaf.endswith("_blocks"):
                    keep = getattr(module, param)[out : out + 1] != 0
                    rows = mxfp4.mask_mxfp4(rows, keep.transpose(-1, -2))
                elif param != leaf and out in edit.changed:
                    cached = requantized.get((param, out))
                    if cached is None:
                        cached, error = quantized_tensors(f"{prefix}.{param}", getattr(module, param)[out : out + 1].float(), index.format)
                        requantized[(param, out)] = cached
                        log.errors[f"{prefix}.{param}[{out}]"] = error
                    rows = cached[key]
                yield rows

        log.zeroed = log.zeroed or edit.zeroed
        pending.append(PendingTensor(key, TORCH_DTYPES[entry.dtype], shape, chunks))
    return pending

