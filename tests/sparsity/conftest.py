"""Tiny expert modules and routed batches with fresh random values for the sparsity tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from grape.sparsity.collect import RoutedBatch


def _randomize(module: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return module


@pytest.fixture
def mixtral_experts() -> Callable[..., nn.Module]:
    """Factory: a MixtralExperts module (E, 2I, H) / (E, H, I) with random float32 weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    def make(hidden: int = 16, inter: int = 8, experts: int = 4, seed: int = 0) -> nn.Module:
        config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts)
        return _randomize(MixtralExperts(config), torch.Generator().manual_seed(seed))

    return make


@pytest.fixture
def gpt_oss_experts() -> Callable[..., nn.Module]:
    """Factory: a GptOssExperts module, stored transposed (E, H, 2I) / (E, I, H), with biases."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    def make(hidden: int = 16, inter: int = 8, experts: int = 4, seed: int = 0) -> nn.Module:
        config = GptOssConfig(
            hidden_size=hidden, intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=2
        )
        return _randomize(GptOssExperts(config), torch.Generator().manual_seed(seed))

    return make


@pytest.fixture
def routed_batch() -> Callable[..., RoutedBatch]:
    """Factory: random tokens with distinct top-k expert ids and positive, unequal weights."""

    def make(tokens: int, hidden: int, experts: int, top_k: int = 2, seed: int = 0) -> RoutedBatch:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(tokens, hidden, generator=gen)
        ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, generator=gen) + 0.05
        return RoutedBatch(x, ids, weights / weights.sum(dim=1, keepdim=True))

    return make


def tiny_mixtral_config(**overrides):
    """MixtralConfig with 2 layers, hidden 32, 4 experts (top-2), intermediate 16."""
    from transformers import MixtralConfig

    values = dict(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    return MixtralConfig(**(values | overrides))


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory) -> Path:
    """A saved float32 tiny Mixtral with randomly initialised weights (read-only in the tests)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_mixtral_config(), dtype=torch.float32)
    path = tmp_path_factory.mktemp("models") / "tiny-mixtral"
    model.save_pretrained(path)
    return path
