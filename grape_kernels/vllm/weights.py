"""Present a grape checkpoint's expert tensors to vLLM in the layout vLLM's loaders read.

grape writes each layer's ``state_dict()`` as transformers 5 holds it in memory: one fused 3-D
tensor per projection (``mlp.experts.gate_up_proj`` of shape (E, 2I, H) with the gate rows
first, ``mlp.experts.down_proj`` of shape (E, H, I)). The checkpoints these architectures are
published in, and so the names vLLM's model classes load, hold one 2-D tensor per expert
(``mlp.experts.{e}.gate_proj.weight``, ``.up_proj.weight``, ``.down_proj.weight``; Mixtral:
``block_sparse_moe.experts.{e}.w1/w3/w2.weight`` and ``block_sparse_moe.gate``). Some of vLLM's
loaders accept the fused form, others (DeepSeek's) only the per-expert one; all of them send a
per-expert tensor through the layer's own expert map, which places it right under expert
parallelism for that layer's count. So the fused tensors are split into per-expert views
(no copies) under the published names.

GPT-OSS is published fused, but vLLM's fused GPT-OSS loader slices expert-parallel ranks with
the model-wide count; its per-expert ("streamed") path, ``mlp.experts.{e}.gate_up_proj`` and so
on, goes through the layer's expert map instead. So GPT-OSS tensors are split per expert too,
each keeping its fused layout and name (:func:`per_expert_slices`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import torch

__all__ = ["PublishedExpertNames", "PUBLISHED_EXPERT_NAMES", "as_published", "per_expert_slices", "layout_for"]

_FUSED_GATE_UP = ".mlp.experts.gate_up_proj"
_FUSED_DOWN = ".mlp.experts.down_proj"
_ROUTER = ".mlp.gate."


@dataclass(frozen=True)
class PublishedExpertNames:
    """Module and projection names of one expert in an architecture's published checkpoints."""

    block: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def expert(self, prefix: str, index: int, projection: str) -> str:
        return f"{prefix}.{self.block}.experts.{index}.{projection}.weight"


_GATED = PublishedExpertNames()
PUBLISHED_EXPERT_NAMES: dict[str, PublishedExpertNames] = {
    "MixtralForCausalLM": PublishedExpertNames(block="block_sparse_moe", gate="w1", up="w3", down="w2"),
    "Qwen2MoeForCausalLM": _GATED,
    "Qwen3MoeForCausalLM": _GATED,
    "OlmoeForCausalLM": _GATED,
    "DeepseekV2ForCausalLM": _GATED,
    "DeepseekV3ForCausalLM": _GATED,
}


def as_published(
    weights: Iterable[tuple[str, torch.Tensor]], names: PublishedExpertNames
) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` with fused expert tensors split per expert under the published names."""
    for name, tensor in weights:
        if name.endswith(_FUSED_GATE_UP) and tensor.dim() == 3:
            prefix = name[: -len(_FUSED_GATE_UP)]
            gate, up = tensor.chunk(2, dim=1)
            for index in range(tensor.shape[0]):
                yield names.expert(prefix, index, names.gate), gate[index]
                yield names.expert(prefix, index, names.up), up[index]
        elif name.endswith(_FUSED_DOWN) and tensor.dim() == 3:
            prefix = name[: -len(_FUSED_DOWN)]
            for index in range(tensor.shape[0]):
                yield names.expert(prefix, index, names.down), tensor[index]
        elif _ROUTER in name and names.block != "mlp":
            yield name.replace(_ROUTER, f".{names.block}.gate."), tensor
        else:
            yield name, tensor


_GPT_OSS_EXPERT_TENSORS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def per_expert_slices(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """GPT-OSS: ``mlp.experts.<tensor>`` (E, ...) as ``mlp.experts.<e>.<tensor>`` views."""
    for name, tensor in weights:
        prefix, _, tensor_name = name.rpartition(".mlp.experts.")
        if prefix and tensor_name in _GPT_OSS_EXPERT_TENSORS:
            for index in range(tensor.shape[0]):
                yield f"{prefix}.mlp.experts.{index}.{tensor_name}", tensor[index]
        else:
            yield name, tensor


def layout_for(architecture: str):
    """The function that presents a grape checkpoint's weights to ``architecture``'s loader, if any."""
    if architecture == "GptOssForCausalLM":
        return per_expert_slices
    names = PUBLISHED_EXPERT_NAMES.get(architecture)
    return None if names is None else partial(as_published, names=names)
