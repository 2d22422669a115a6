"""Architecture records and routing specs against the real transformers modules of every architecture."""

import pytest
import torch
from tiny_models import ARCHS, build_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from grape_kernels.architectures import UnsupportedModelError, get_adapter
from grape_kernels.experts_module import expert_forward
from grape_kernels.routing import route


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, path, AutoModelForCausalLM.from_pretrained(path).eval()


def test_roundtrip_from_disk_and_moe_layers(tiny):
    arch, path, model = tiny
    config = AutoConfig.from_pretrained(path)
    adapter = get_adapter(config)
    layers = adapter.decoder_layers(model)
    found = [i for i, layer in enumerate(layers) if adapter.moe_block(layer) is not None]
    assert found == adapter.moe_layer_indices(config)
    for i in found:
        block = adapter.moe_block(layers[i])
        assert block.experts.num_experts == adapter.num_experts(config)
        for name in adapter.shared_attrs:
            assert hasattr(block, name)


def test_routing_spec_matches_model_router(tiny):
    arch, _, model = tiny
    adapter = get_adapter(model.config)
    block = adapter.moe_block(adapter.decoder_layers(model)[-1])
    x = torch.randn(50, model.config.hidden_size)
    with torch.no_grad():
        _, weights, ids = adapter.router(block)(x)
        logits = adapter.router_logits(block, x)
    spec = adapter.routing_spec(model.config, adapter.router(block))
    my_ids, my_weights = route(logits, spec)
    order, my_order = ids.sort(-1).indices, my_ids.sort(-1).indices
    torch.testing.assert_close(my_ids.gather(1, my_order), ids.long().gather(1, order))
    torch.testing.assert_close(my_weights.gather(1, my_order), weights.float().gather(1, order), rtol=1e-5, atol=1e-6)


def test_expert_forward_matches_eager_block(tiny):
    """Per-expert outputs recombined with routing weights reproduce the experts module."""
    arch, _, model = tiny
    adapter = get_adapter(model.config)
    block = adapter.moe_block(adapter.decoder_layers(model)[-1])
    x = torch.randn(30, model.config.hidden_size)
    experts = block.experts
    with torch.no_grad():
        _, weights, ids = adapter.router(block)(x)
        expected = experts(x, ids, weights)
        manual = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for slot in range(ids.shape[1]):
                e = int(ids[t, slot])
                manual[t] += weights[t, slot] * expert_forward(experts, e, x[t : t + 1])[0]
    torch.testing.assert_close(manual, expected, rtol=1e-4, atol=1e-5)


def test_non_moe_model_is_rejected_with_supported_list():
    config = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=32)
    with pytest.raises(UnsupportedModelError, match="Mixtral.*Qwen2-MoE.*GPT-OSS"):
        get_adapter(config)


def test_min_experts_respects_groups():
    from tiny_models import tiny_config

    v3 = tiny_config("deepseek_v3")  # 8 experts, 2 groups, topk_group 1, top-2
    assert get_adapter(v3).min_experts(v3) == 4  # 2 per group: top-2 within the single chosen group
    assert get_adapter(tiny_config("mixtral")).min_experts(tiny_config("mixtral")) == 2
