"""On a CUDA GPU: the routed layer runs without host synchronisation, replays in a CUDA graph,
a model on grape's GPU kernels compiles with ``fullgraph=True``, and swapped models match eager.

Skipped without a GPU (``benchmarks/gpu_check.py`` runs it there). What can be checked
without one, that the launch path never reads tensor values, is in ``test_compile.py``.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model
from transformers import AutoModelForCausalLM

from grape_kernels import ExpertWeights, routing_function, select_routing_backend
from grape_kernels.routing import kernel_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _layer(dtype: torch.dtype, tokens: int = 64, experts: int = 16, hidden: int = 256, inter: int = 128):
    g = torch.Generator(device="cuda").manual_seed(tokens + experts)
    weights = ExpertWeights(
        (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g) / hidden**0.5).to(dtype),
        (torch.randn(experts, hidden, inter, device="cuda", generator=g) / inter**0.5).to(dtype),
    )
    logits = torch.randn(tokens, experts, device="cuda", generator=g)
    return torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype), logits, weights


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_routed_layer_has_no_host_sync_and_replays_in_a_cuda_graph(dtype):
    from grape_kernels.triton import fused_experts

    hidden, logits, weights = _layer(dtype)
    route = routing_function(select_routing_backend("cuda", "triton"))
    spec = kernel_spec("sigmoid_group", 4, n_group=4, topk_group=2, renormalize=True,
                       correction_bias=torch.zeros(16, device="cuda"))

    def layer() -> torch.Tensor:
        ids, topk_weights = route(logits, spec)
        return fused_experts(hidden, weights, ids, topk_weights)

    layer()  # compile the kernels and fill the config caches outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer()
    finally:
        torch.cuda.set_sync_debug_mode(0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer()
    fresh_hidden, fresh_logits, _ = _layer(dtype, tokens=64, experts=16)
    hidden.copy_(fresh_hidden.flip(0))
    logits.copy_(fresh_logits * 3)
    graph.replay()
    torch.testing.assert_close(captured, layer(), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_model_on_gpu_kernels_compiles_fullgraph(arch, tmp_path):
    path = build_tiny_model(arch, tmp_path / arch)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="grape", dtype=torch.bfloat16)
    model = model.cuda().eval()
    ids = torch.randint(0, 320, (2, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits.float()
        got = torch.compile(model, fullgraph=True)(ids).logits.float()
    torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "deepseek_v2", "gpt_oss"])
def test_swapped_model_on_gpu_matches_eager(arch, tmp_path):
    """swap_moe_blocks on a CUDA model: GPU routing kernels (CUDA op or Triton) and Triton experts."""
    from grape_kernels import swap_moe_blocks

    path = build_tiny_model(arch, tmp_path / arch, hidden_size=64)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").cuda().eval()
    ids = torch.randint(0, 320, (2, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        swap_moe_blocks(model, "auto")
        got = model(ids).logits
    blocks = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert all("forward" in vars(getattr(block, "router", getattr(block, "gate", None))) for block in blocks)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
