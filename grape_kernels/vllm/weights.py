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
(no copies) under the published names. GPT-OSS is published fused and is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["PublishedExpertNames", "PUBLISHED_EXPERT_NAMES", "as_published"]

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
