"""The plugin's parts that need no vLLM engine: weight names, refusals, layer-wise counts, registration.

The weight-name, refusal and config tests run in the default environment too (they need only
torch and transformers); the others need vLLM's modules and skip without them.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_tiny_model

from grape_kernels.vllm.ragged import RaggedCheckpointError, check_parallel_config, expert_counts
from grape_kernels.vllm.weights import PUBLISHED_EXPERT_NAMES, as_published

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
# Selected by .ci/serve (-m vllm) in the serve environment; the default run takes them all too.
pytestmark = pytest.mark.vllm


@pytest.mark.parametrize(
    "arch, architecture",
    [("mixtral", "MixtralForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM"), ("deepseek_v3", "DeepseekV3ForCausalLM")],
)
def test_fused_experts_become_the_names_transformers_saves(arch, architecture, tmp_path):
    """Reference: transformers' own ``save_pretrained`` (its reverse weight conversion)."""
    from transformers import AutoModelForCausalLM

    directory = build_tiny_model(arch, tmp_path / arch, seed=torch.seed() % 2**31)
    saved = load_file(str(directory / "model.safetensors"))
    in_memory = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).state_dict()
    published = dict(as_published(in_memory.items(), PUBLISHED_EXPERT_NAMES[architecture]))
    assert published.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(published[name], tensor), name


def _vllm_config(*, eplb: bool = False, weight_filter: bool = False):
    return SimpleNamespace(parallel_config=SimpleNamespace(enable_eplb=eplb, enable_ep_weight_filter=weight_filter))


def test_features_that_assume_one_count_are_refused_for_ragged_checkpoints():
    ragged, uniform = [None, 4, 8], [None, 6, 6]
    for flags in ({"eplb": True}, {"weight_filter": True}):
        with pytest.raises(RaggedCheckpointError, match="ragged"):
            check_parallel_config(_vllm_config(**flags), ragged)
        check_parallel_config(_vllm_config(**flags), uniform)
    check_parallel_config(_vllm_config(), ragged)


def test_expert_counts_reads_only_grape_checkpoints():
    assert expert_counts(SimpleNamespace(num_hidden_layers=2)) is None
    assert expert_counts(SimpleNamespace(num_hidden_layers=2, grape_experts_per_layer=[3, None])) == [3, None]
    with pytest.raises(RaggedCheckpointError, match="3 entries for 2"):
        expert_counts(SimpleNamespace(num_hidden_layers=2, grape_experts_per_layer=[1, 2, 3]))


@needs_vllm
def test_each_layer_is_built_with_its_own_count_and_the_config_is_restored():
    from grape_kernels.vllm.ragged import layerwise_expert_counts

    config = SimpleNamespace(n_routed_experts=8)

    def stock_make_layers(num_hidden_layers, layer_fn, prefix):
        return [layer_fn(prefix=f"{prefix}.{i}") for i in range(num_hidden_layers)]

    module = SimpleNamespace(make_layers=stock_make_layers)
    counts = [None, 3, 8, 5]
    with layerwise_expert_counts(module, config, "n_routed_experts", counts):
        seen = module.make_layers(4, lambda prefix: (prefix, config.n_routed_experts), "model.layers")
    assert seen == [("model.layers.0", 8), ("model.layers.1", 3), ("model.layers.2", 8), ("model.layers.3", 5)]
    assert config.n_routed_experts == 8 and module.make_layers is stock_make_layers

    with pytest.raises(KeyError), layerwise_expert_counts(module, config, "n_routed_experts", counts):
        module.make_layers(2, lambda prefix: {}[prefix], "model.layers")
    assert config.n_routed_experts == 8 and module.make_layers is stock_make_layers


@needs_vllm
def test_the_entry_point_registers_both_names_of_every_architecture():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _VLLM_MODELS

    from grape_kernels.vllm import models, register
    from grape_kernels.vllm.registration import served_architectures

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.value == "grape_kernels.vllm:register"]
    assert plugin.load() is register
    register()
    served = served_architectures()
    assert set(served) == {
        "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
        "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "GptOssForCausalLM",
    }
    for architecture in served:
        ragged = getattr(models, f"Grape{architecture}")
        assert issubclass(ragged, models.stock_class(architecture))
        assert _VLLM_MODELS[architecture][1] == architecture
        for name in (architecture, f"Grape{architecture}"):
            resolved = ModelRegistry.models[name]
            assert (resolved.module_name, resolved.class_name) == ("grape_kernels.vllm.models", f"Grape{architecture}")
