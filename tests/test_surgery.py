"""Expert surgery against independent references: masking router logits, weight averages."""

import copy

import pytest
import torch
from tiny_models import ARCHS, build_tiny_model
from transformers import AutoModelForCausalLM

from grape.surgery import SurgeryError, prune_block
from grape_kernels.architectures import get_adapter
from grape_kernels.routing import route

# keeps 6 of 8 experts, the same number in each half (valid for 2-group routing)
KEEP = [0, 1, 3, 5, 6, 7]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _prune_all(model, keep):
    adapter = get_adapter(model.config)
    for layer in adapter.decoder_layers(model):
        block = adapter.moe_block(layer)
        if block is not None:
            prune_block(block, adapter, keep, n_group=adapter.n_group(model.config))
    return model


def test_keeping_every_expert_reproduces_logits_exactly(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 12))
    pruned = _prune_all(copy.deepcopy(tiny), list(range(8)))
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, tiny(ids).logits)


def test_dropping_experts_equals_masking_their_router_logits(tiny):
    adapter = get_adapter(tiny.config)
    keep_mask = torch.zeros(8, dtype=torch.bool)
    keep_mask[KEEP] = True
    masked = copy.deepcopy(tiny)
    for layer in adapter.decoder_layers(masked):
        block = adapter.moe_block(layer)
        if block is None:
            continue
        router = adapter.router(block)
        spec = adapter.routing_spec(masked.config, router)

        def hook(module, inputs, output, block=block, spec=spec):
            logits = adapter.router_logits(block, inputs[0].reshape(-1, inputs[0].shape[-1]))
            ids, weights = route(logits, spec, keep=keep_mask)
            return output[0], weights.to(output[1].dtype), ids

        router.register_forward_hook(hook)
    pruned = _prune_all(copy.deepcopy(tiny), KEEP)
    for layer in adapter.decoder_layers(pruned):
        block = adapter.moe_block(layer)
        if block is not None:
            assert block.experts.num_experts == len(KEEP)
            assert adapter.router(block).weight.shape[0] == len(KEEP)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, masked(ids).logits, rtol=1e-4, atol=1e-5)


def test_slicing_covers_biases_and_correction_bias(tiny):
    adapter = get_adapter(tiny.config)
    model = copy.deepcopy(tiny)
    block = next(b for b in map(adapter.moe_block, adapter.decoder_layers(model)) if b is not None)
    before = {n: t.clone() for m in adapter.expert_modules(block) for n, t in list(m.named_parameters()) + list(m.named_buffers())}
    shared_before = {n: p.clone() for a in adapter.shared_attrs for n, p in getattr(block, a).named_parameters()}
    prune_block(block, adapter, KEEP, n_group=adapter.n_group(model.config))
    after = {n: t for m in adapter.expert_modules(block) for n, t in list(m.named_parameters()) + list(m.named_buffers())}
    for name, tensor in before.items():
        if tensor.dim() and tensor.shape[0] == 8:
            assert torch.equal(after[name], tensor[KEEP]), name
    for name, p in shared_before.items():
        assert torch.equal(dict((n, q) for a in adapter.shared_attrs for n, q in getattr(block, a).named_parameters())[name], p)


def test_merge_is_frequency_weighted_average():
    from tiny_models import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    adapter = get_adapter(model.config)
    block = adapter.moe_block(adapter.decoder_layers(model)[0])
    w = block.experts.gate_up_proj.detach().clone()
    d = block.experts.down_proj.detach().clone()
    freq = torch.tensor([10.0, 30.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0])
    keep = [1, 2, 3, 4, 5, 6]
    prune_block(block, adapter, keep, merge_into={0: 1, 7: 4}, freq=freq)
    expected_1 = (10 * w[0] + 30 * w[1]) / 40
    expected_4 = (1 * w[4] + 1 * w[7]) / 2
    torch.testing.assert_close(block.experts.gate_up_proj[0], expected_1)
    torch.testing.assert_close(block.experts.gate_up_proj[3], expected_4)
    torch.testing.assert_close(block.experts.down_proj[0], (10 * d[0] + 30 * d[1]) / 40)
    assert torch.equal(block.experts.gate_up_proj[1], w[2])


@pytest.mark.parametrize(
    "keep, kwargs, match",
    [
        ([0, 0, 1], {}, "not a set"),
        ([0, 9], {}, "not a set"),
        ([0], {"min_keep": 2}, "fewer than the minimum"),
        ([0, 1, 2, 4], {"n_group": 2}, "same count kept in each"),
    ],
)
def test_invalid_plans_are_refused(keep, kwargs, match):
    from tiny_models import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    adapter = get_adapter(model.config)
    block = adapter.moe_block(adapter.decoder_layers(model)[0])
    with pytest.raises(SurgeryError, match=match):
        prune_block(block, adapter, keep, **kwargs)
