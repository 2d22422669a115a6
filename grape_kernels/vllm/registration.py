"""Which names the plugin registers with vLLM, and why that needs no flags.

A grape checkpoint's ``config.json`` names its architecture in two places: ``architectures``
keeps the original class (``MixtralForCausalLM``), and ``auto_map`` points transformers at
``modeling_grape.Grape<Architecture>`` (which is also what ``architectures`` becomes when the
model is re-saved by transformers). vLLM picks the class by ``architectures``. So, through
vLLM's public ``ModelRegistry.register_model``, each architecture grape prunes and vLLM
implements is registered under both names, pointing at
:mod:`grape_kernels.vllm.models`' subclass. The subclass runs vLLM's stock constructor
unchanged unless the config carries ``grape_experts_per_layer``, so every other checkpoint is
served exactly as before; ``VLLM_PLUGINS`` (vLLM's own switch) turns the plugin off.
"""

from __future__ import annotations

from grape_kernels.architectures import ADAPTERS
from grape_kernels.vllm.models import PREFIX

__all__ = ["served_architectures", "register_ragged_models"]


def served_architectures() -> list[str]:
    """Causal-LM class names of grape's architectures that this vLLM implements."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from vllm.model_executor.models.registry import _VLLM_MODELS

    names = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(t) for a in ADAPTERS for t in a.model_types]
    return [name for name in names if name in _VLLM_MODELS]


def register_ragged_models() -> None:
    """Register ``Grape<Arch>`` and ``<Arch>`` for every served architecture (idempotent)."""
    from vllm import ModelRegistry

    for architecture in served_architectures():
        target = f"grape_kernels.vllm.models:{PREFIX}{architecture}"
        ModelRegistry.register_model(f"{PREFIX}{architecture}", target)
        ModelRegistry.register_model(architecture, target)
