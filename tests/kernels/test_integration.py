"""transformers integration: experts_implementation="grape", ragged models, swap_moe_blocks.

Each architecture is built from a tiny random config (2 layers, hidden 64, 8 experts, top-2)
with ``save_pretrained`` and loaded back, so the path is the one users take. Whole-model
logits are compared with transformers' own eager experts in float32, on the model as loaded
and after layer 1 is pruned to 4 experts by slicing (a ragged model: E differs per layer).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, build_tiny_model
from torch import nn

import grape_kernels
from grape_kernels import available_backends, swap_moe_blocks
from grape_kernels.ops import reference_route_topk
from grape_kernels.routing import RoutingSpec, kernel_mode

transformers = pytest.importorskip("transformers")
AutoModelForCausalLM = transformers.AutoModelForCausalLM

KEEP = [0, 2, 5, 7]  # two experts from each half: keeps DeepSeek-V3's 2 groups valid (2 per group)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny random model per architecture (hidden 64, routers spread by large weights)."""
    return {arch: build_tiny_model(arch, tmp_path_factory.mktemp(arch), hidden_size=64) for arch in ARCHS}


def _load(path: Path, implementation: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation=implementation, dtype=dtype)
    return model.eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _ids(model: nn.Module, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def _router(block: nn.Module) -> nn.Module:
    return block.router if hasattr(block, "router") else block.gate


def _prune_layer(model: nn.Module, layer: int, keep: list[int]) -> None:
    """Slice one layer's routed experts (router rows, biases, 3-D weights) down to ``keep``."""
    block = model.model.layers[layer].mlp
    index = torch.tensor(keep)
    for module in (_router(block), block.experts):
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor.dim() >= 1 and tensor.shape[0] == module.num_experts:
                sliced = tensor.detach().index_select(0, index).clone()
                if isinstance(tensor, torch.nn.Parameter):
                    setattr(module, name, torch.nn.Parameter(sliced, requires_grad=tensor.requires_grad))
                else:
                    module.register_buffer(name, sliced)
        module.num_experts = len(keep)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= tol * max(scale, 1.0)


def test_grape_is_registered_in_transformers():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["grape"] is grape_kernels.grape_experts_forward


@pytest.fixture
def grape_calls(monkeypatch) -> list[int]:
    """Expert counts of the layers the "grape" implementation ran, in call order."""
    calls: list[int] = []
    real = grape_kernels.integration.experts_forward

    def spy(weights: grape_kernels.ExpertWeights, *args, **kwargs) -> torch.Tensor:
        calls.append(weights.w_gate_up.shape[0])
        return real(weights, *args, **kwargs)

    monkeypatch.setattr(grape_kernels.integration, "experts_forward", spy)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_grape_matches_eager_dense_and_ragged(arch, checkpoints, grape_calls):
    grape = _load(checkpoints[arch], "grape")
    eager = _load(checkpoints[arch], "eager")
    assert grape.config._experts_implementation == "grape"
    ids = _ids(grape)
    _close(_logits(grape, ids), _logits(eager, ids))
    moe_layers = len(_moe_blocks(grape))
    assert grape_calls == [8] * moe_layers

    for model in (grape, eager):
        _prune_layer(model, len(model.model.layers) - 1, KEEP)
    grape_calls.clear()
    _close(_logits(grape, ids), _logits(eager, ids))
    assert grape_calls == [8] * (moe_layers - 1) + [len(KEEP)]


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_set_experts_implementation_switches_to_grape(arch, checkpoints):
    model = _load(checkpoints[arch], "eager")
    ids = _ids(model, seed=1)
    expected = _logits(model, ids)
    model.set_experts_implementation("grape")
    assert model.config._experts_implementation == "grape"
    _close(_logits(model, ids), expected)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("backend", ["auto", "cpu", "dense", "reference"])
def test_swap_moe_blocks(arch, backend, checkpoints):
    model = _load(checkpoints[arch], "eager")
    ids = _ids(model, seed=2)
    expected = _logits(model, ids)
    assert swap_moe_blocks(model, backend) is model
    blocks = _moe_blocks(model)
    assert all(block.experts.grape_backend == backend for block in blocks)
    swapped_router = "forward" in vars(_router(blocks[0]))
    assert swapped_router == (backend == "reference"), "only backends with a routing kernel replace routers"
    _close(_logits(model, ids), expected)


def test_swap_moe_blocks_routes_through_given_kernel(checkpoints):
    """Every router rule reaches the routing kernel and reproduces the architecture's router."""
    calls = []

    def route(logits: torch.Tensor, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(kernel_mode(spec))
        return reference_route_topk(logits, spec)

    for arch in ARCHS:
        model = _load(checkpoints[arch], "eager")
        ids = _ids(model, seed=3)
        expected = _logits(model, ids)
        before = len(calls)
        swap_moe_blocks(model, "cpu", route_fn=route)
        _close(_logits(model, ids), expected)
        assert len(calls) - before == len(_moe_blocks(model)), arch


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if "triton" in available_backends("cpu") else []))
def test_deepseek_v2_group_limited_router_is_swapped(backend, checkpoints):
    """DeepSeek-V2's group_limited_greedy (softmax, groups scored by their best probability)
    routes through the kernels and reproduces the model."""
    model = _load(checkpoints["deepseek_v2"], "eager")
    model.config.topk_method, model.config.n_group, model.config.topk_group = "group_limited_greedy", 4, 2
    for block in _moe_blocks(model):
        block.gate.topk_method = "group_limited_greedy"
        block.gate.num_group, block.gate.topk_group = 4, 2
    ids = _ids(model)[:, :5]
    expected = _logits(model, ids)
    swap_moe_blocks(model, backend)
    assert all("forward" in vars(block.gate) for block in _moe_blocks(model))
    _close(_logits(model, ids), expected, tol=1e-4)


@pytest.mark.interpreter
@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="Triton needs TRITON_INTERPRET=1 or CUDA")
def test_swap_moe_blocks_triton_under_interpreter(checkpoints):
    """The whole dispatch (Triton routing + fused experts) on one small model, interpreted."""
    model = _load(checkpoints["qwen3_moe"], "eager")
    ids = torch.randint(0, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(4))
    expected = _logits(model, ids)
    swap_moe_blocks(model, "triton")
    assert "forward" in vars(_moe_blocks(model)[0].gate)
    _close(_logits(model, ids), expected, tol=1e-4)


def test_bfloat16_model(checkpoints):
    grape = _load(checkpoints["mixtral"], "grape", torch.bfloat16)
    eager = _load(checkpoints["mixtral"], "eager", torch.bfloat16)
    ids = _ids(grape)
    _close(_logits(grape, ids), _logits(eager, ids), tol=5e-2)


def test_autograd_falls_back_to_grouped_mm(checkpoints, caplog, monkeypatch):
    model = _load(checkpoints["olmoe"], "grape")
    ids = _ids(model)
    expected = _logits(model, ids)
    monkeypatch.setattr(grape_kernels.integration, "_noticed", set())
    with caplog.at_level(logging.WARNING, logger="grape_kernels.integration"):
        logits = model(ids).logits
    assert "inference-only" in caplog.text
    logits.sum().backward()
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad is not None
    _close(logits.detach(), expected)


def test_swap_moe_blocks_rejects_bad_calls(checkpoints):
    model = _load(checkpoints["mixtral"], "eager")
    with pytest.raises(ValueError, match="unknown experts backend 'fastest'"):
        swap_moe_blocks(model, "fastest")
    if "triton" not in available_backends("cpu"):
        with pytest.raises(ValueError, match="cannot run on cpu"):
            swap_moe_blocks(model, "triton")
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32))
    with pytest.raises(ValueError, match="no transformers experts modules"):
        swap_moe_blocks(dense)


def test_trained_model_pruned_ragged(shared_model):
    """The trained Mixtral in ../shared, every layer pruned to its own E, grape vs eager (bf16)."""
    grape = _load(shared_model, "grape", torch.bfloat16)
    eager = _load(shared_model, "eager", torch.bfloat16)
    for model in (grape, eager):
        for layer in range(len(model.model.layers)):
            _prune_layer(model, layer, list(range(8 - layer % 4)))
    counts = [block.experts.gate_up_proj.shape[0] for block in _moe_blocks(grape)]
    assert len(set(counts)) == 4
    ids = _ids(grape, seed=5)
    _close(_logits(grape, ids), _logits(eager, ids), tol=5e-2)
