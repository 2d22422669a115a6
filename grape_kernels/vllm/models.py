"""Ragged subclasses of vLLM's MoE model classes, created on first use.

``Grape<Architecture>`` (e.g. ``GrapeMixtralForCausalLM``) subclasses vLLM's own class of that
name. On a config without ``grape_experts_per_layer`` it *is* the stock model: the constructor
is vLLM's, untouched, which is why the plugin may register it under the stock name too. On a
grape checkpoint the stock constructor runs inside :func:`~grape_kernels.vllm.ragged.layerwise_expert_counts`,
so every MoE layer is vLLM's fused-MoE layer built with the layer's own expert count, and the
model-wide expert numbers of vLLM's ``MixtureOfExperts`` interface are set to the largest
layer's (vLLM's Mixtral and Qwen3-MoE otherwise take them from whichever layer came last).

The classes are made lazily by the module ``__getattr__`` (PEP 562): vLLM registers them as
``"grape_kernels.vllm.models:GrapeMixtralForCausalLM"`` strings, so only the architecture
being served imports its vLLM module.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable

import torch

from grape_kernels.architectures import get_adapter
from grape_kernels.vllm.ragged import check_parallel_config, expert_counts, layerwise_expert_counts
from grape_kernels.vllm.weights import layout_for

PREFIX = "Grape"
_classes: dict[str, type] = {}


def stock_class(architecture: str) -> type:
    """vLLM's own class for ``architecture`` (read from vLLM's table, which plugins never change)."""
    from vllm.model_executor.models.registry import _VLLM_MODELS

    module_name, class_name = _VLLM_MODELS[architecture]
    module = importlib.import_module(f"vllm.model_executor.models.{module_name}")
    return getattr(module, class_name)


def _set_model_wide_counts(model, counts: list[int | None]) -> None:
    """Model-wide expert numbers = the largest layer's (what ``get_num_experts()`` reports)."""
    largest = max(c for c in counts if c is not None)
    for name in ("num_logical_experts", "num_routed_experts"):
        if hasattr(model, name):
            setattr(model, name, largest)
    if hasattr(model, "num_physical_experts"):
        redundant = int(getattr(model, "num_redundant_experts", 0) or 0)
        model.num_physical_experts = largest + redundant
    runners = getattr(model, "moe_layers", ())
    if hasattr(model, "num_local_physical_experts") and runners:
        # Without EPLB (refused for ragged checkpoints) each rank holds its share of a layer's
        # experts; the model-wide figure is the share of the largest layer.
        model.num_local_physical_experts = max(runner.moe_config.num_local_experts for runner in runners)


def make_ragged_class(architecture: str) -> type:
    """``Grape<architecture>``: vLLM's class for ``architecture`` with per-layer expert counts."""
    stock = stock_class(architecture)
    model_module = sys.modules[stock.__module__]
    present = layout_for(architecture)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        counts = expert_counts(hf_config)
        if counts is None:
            stock.__init__(self, vllm_config=vllm_config, prefix=prefix)
        else:
            check_parallel_config(vllm_config, counts)
            count_key = get_adapter(hf_config).count_key
            with layerwise_expert_counts(model_module, hf_config, count_key, counts):
                stock.__init__(self, vllm_config=vllm_config, prefix=prefix)
            _set_model_wide_counts(self, counts)
        self.grape_experts_per_layer = counts

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        if self.grape_experts_per_layer is not None and present is not None:
            weights = present(weights)
        return stock.load_weights(self, weights)

    name = f"{PREFIX}{architecture}"
    return type(
        name,
        (stock,),
        {
            "__init__": __init__,
            "load_weights": load_weights,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"vLLM's {architecture} whose MoE layers keep a grape checkpoint's per-layer expert counts.",
        },
    )


def __getattr__(name: str) -> type:
    if not name.startswith(PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _classes:
        try:
            _classes[name] = make_ragged_class(name[len(PREFIX):])
        except KeyError:
            raise AttributeError(f"vLLM has no model class {name[len(PREFIX):]!r} to make {name!r} from") from None
    return _classes[name]
