"""Ragged MoE models: every layer keeps its own number of routed experts.

This file is self-contained on purpose (it imports only torch and transformers): a pruned
checkpoint ships a copy of it as ``modeling_grape.py`` so that plain
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads the checkpoint on
machines without grape. grape itself imports the same code, so there is one implementation.

How it works: transformers' MoE blocks are built from one config-wide expert count. After the
stock model is constructed (on whatever device transformers chooses, usually meta), each MoE
block named in ``config.grape_experts_per_layer`` is resized: every tensor of its router and its
experts whose leading dimension is the expert count is replaced by one with the layer's count,
and the modules' ``num_experts`` attributes are updated. The checkpoint weights then load into
the resized tensors as usual. Shared experts are separate modules and are never touched.
"""

from __future__ import annotations

import torch
from torch import nn

GRAPE_COUNTS_KEY = "grape_experts_per_layer"
GRAPE_LAYOUT_KEY = "grape_moe_layout"


def select_experts(modules: tuple[nn.Module, ...], index: torch.Tensor | None, new_count: int) -> None:
    """Keep experts ``index`` (or, with ``index=None``, resize to ``new_count`` uninitialised ones).

    Acts on every parameter and buffer whose leading dimension equals the modules' current
    expert count, so fused 3-D weights, expert biases, router rows, router biases and
    ``e_score_correction_bias`` are all sliced consistently, whatever the architecture.
    """
    for module in modules:
        old_count = int(module.num_experts)
        for name, tensor in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        ):
            if tensor.dim() == 0 or tensor.shape[0] != old_count:
                continue
            if index is None:
                value = torch.empty((new_count, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
            else:
                value = tensor.detach().index_select(0, index.to(tensor.device)).clone()
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, nn.Parameter(value, requires_grad=tensor.requires_grad))
            else:
                module._buffers[name] = value
        module.num_experts = new_count


def moe_modules(layer: nn.Module, layout: dict) -> tuple[nn.Module, ...] | None:
    """The (router, experts) modules of a decoder layer, or None for a dense layer."""
    block = getattr(layer, layout["block_attr"], None)
    if block is None or not hasattr(block, "experts"):
        return None
    return (getattr(block, layout["router_attr"]), block.experts)


def apply_ragged_experts(model: nn.Module) -> nn.Module:
    """Resize every MoE layer of a freshly built model to the counts recorded in its config."""
    config = model.config
    counts = getattr(config, GRAPE_COUNTS_KEY, None)
    if not counts:
        return model
    layout = getattr(config, GRAPE_LAYOUT_KEY, None) or {"block_attr": "mlp", "router_attr": "gate"}
    layers = getattr(model, "model", model).layers
    if len(counts) != len(layers):
        raise ValueError(f"{GRAPE_COUNTS_KEY} has {len(counts)} entries for {len(layers)} decoder layers")
    for layer, count in zip(layers, counts):
        modules = moe_modules(layer, layout)
        if modules is None or count is None:
            continue
        if int(modules[1].num_experts) != int(count):
            select_experts(modules, None, int(count))
    return model


def make_ragged_class(base: type) -> type:
    """A subclass of ``base`` (a ``*ForCausalLM``) that builds the ragged expert layout."""

    class RaggedForCausalLM(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            apply_ragged_experts(self)

    RaggedForCausalLM.__name__ = f"GrapeRagged{base.__name__}"
    RaggedForCausalLM.__qualname__ = RaggedForCausalLM.__name__
    return RaggedForCausalLM
