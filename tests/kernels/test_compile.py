"""torch.compile and CUDA-graph readiness: the kernels' custom ops, whole compiled models, no host syncs.

- Every CPU-runnable entry point passes ``torch.library.opcheck`` (schema, fake implementation
  against the real one, functionalization) on fresh random inputs.
- Tiny models compile with ``fullgraph=True`` (a graph break would raise), the captured graph
  holds the grape op (so the kernels, not a fallback, ran), and compiled logits equal eager.
- The Triton launchers run on ``meta`` tensors with kernel launches stubbed out: any read of a
  tensor value on the host (``.item()``, ``.tolist()``, ``bool(tensor)``, data-dependent
  branching) fails on meta tensors, so this proves the routing/align/GEMM launch path never
  synchronises with the device (what CUDA-graph capture requires). The CUDA wrappers, which
  cannot run here, get a static check for host-reading calls.
"""

from __future__ import annotations

import ast
import dataclasses
import zlib
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

import grape_kernels
from grape_kernels import ExpertWeights, available_backends, get_backend, routing_function, swap_moe_blocks
from grape_kernels.routing import kernel_spec

TRITON_HERE = "triton" in available_backends("cpu")
PACKAGE = Path(grape_kernels.__file__).parent


def _layer(seed: int, *, gpt_oss: bool = False) -> tuple[torch.Tensor, ExpertWeights, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    experts, hidden, inter, tokens = 6, 16, 8, 5
    if gpt_oss:
        weights = ExpertWeights(torch.randn(experts, hidden, 2 * inter, generator=g),
                                torch.randn(experts, inter, hidden, generator=g),
                                torch.randn(experts, 2 * inter, generator=g), torch.randn(experts, hidden, generator=g),
                                "gpt_oss", 1.702, 1.5, True, True)
    else:
        weights = ExpertWeights(torch.randn(experts, 2 * inter, hidden, generator=g),
                                torch.randn(experts, hidden, inter, generator=g))
    ids = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :2]
    return torch.randn(tokens, hidden, generator=g), weights, ids, torch.rand(tokens, 2, generator=g)


@pytest.mark.parametrize("gpt_oss", [False, True], ids=["mixtral", "gpt_oss"])
@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_experts_ops_pass_opcheck(backend, gpt_oss):
    """Every registered experts backend that runs here is a custom op (a new one is checked by registering)."""
    entry = get_backend(backend).load()
    hidden, weights, ids, topk_weights = _layer(zlib.crc32(backend.encode()), gpt_oss=gpt_oss)
    torch.library.opcheck(entry.op, (hidden, *weights, ids, topk_weights))
    with torch.no_grad():
        via_op = entry.op(hidden, *weights, ids, topk_weights)
    torch.testing.assert_close(via_op, entry(hidden, weights, ids, topk_weights))


ROUTING_SPECS = [
    kernel_spec("softmax_topk", 2, renormalize=True),
    kernel_spec("topk_softmax", 3),
    kernel_spec("sigmoid_group", 3, correction_bias=torch.randn(8, generator=torch.Generator().manual_seed(0)), n_group=4, topk_group=2, scaling=2.5),
    kernel_spec("softmax_topk", 3, n_group=4, topk_group=1),
]


@pytest.mark.parametrize("spec", ROUTING_SPECS, ids=lambda s: f"{s.score_fn}-k{s.top_k}-g{s.n_group}")
@pytest.mark.parametrize("backend", available_backends("cpu", kind="routing"))
def test_routing_ops_pass_opcheck(backend, spec):
    from grape_kernels.library import spec_fields

    logits = torch.randn(7, 8, generator=torch.Generator().manual_seed(spec.top_k))
    torch.library.opcheck(routing_function(backend).op, (logits, *spec_fields(spec)))


@pytest.mark.skipif(not TRITON_HERE, reason="Triton is not installed")
def test_triton_align_op_passes_opcheck():
    from grape_kernels.triton import align_block_size

    ids = torch.rand(7, 8, generator=torch.Generator().manual_seed(0)).argsort(dim=1)[:, :3]
    torch.library.opcheck(align_block_size.op, (ids, 8, 16))


def _load(path: Path, implementation: str = "eager") -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, experts_implementation=implementation).eval()


def _compiled_graphs(model: nn.Module, inputs: list[torch.Tensor], backend: str = "aot_eager") -> tuple[list, str]:
    """(outputs per input, code of the graph) of ``torch.compile(model, fullgraph=True, dynamic=True)``.

    ``fullgraph=True`` makes any graph break an error; the graph must also serve every input
    (dynamo may hand a first attempt of the same frame to the backend before its final one,
    but no input after the first may compile anything new).
    """
    codes: list[str] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        codes.append(gm.code)
        return torch._dynamo.backends.registry.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=record)
    with torch.no_grad():
        outputs = [compiled(inputs[0]).logits]
        first = len(codes)
        outputs += [compiled(ids).logits for ids in inputs[1:]]
    torch._dynamo.reset()
    assert len(codes) == first, "a later input recompiled the model"
    return outputs, codes[-1]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    return build_tiny_model("mixtral", tmp_path_factory.mktemp("mixtral"))


def _token_batches(*lengths: int) -> list[torch.Tensor]:
    return [torch.randint(0, 320, (2, n), generator=torch.Generator().manual_seed(n)) for n in lengths]


def test_grape_experts_implementation_compiles_fullgraph(mixtral):
    """One graph for every sequence length, with grape's CPU experts op in it, equal to eager."""
    model = _load(mixtral, "grape")
    inputs = _token_batches(5, 9, 14)
    with torch.no_grad():
        expected = [model(ids).logits for ids in inputs]
    outputs, code = _compiled_graphs(model, inputs)
    assert "torch.ops.grape.cpu_experts" in code
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_grape_experts_implementation_compiles_with_inductor(mixtral):
    """The issue's case: inductor's CPU code around grape's op, compiled logits equal eager."""
    model = _load(mixtral, "grape")
    ids = _token_batches(8)
    with torch.no_grad():
        expected = model(ids[0]).logits
    outputs, code = _compiled_graphs(model, ids, backend="inductor")
    assert "torch.ops.grape.cpu_experts" in code
    torch.testing.assert_close(outputs[0], expected, rtol=1e-4, atol=1e-5)


SWAPS = [("deepseek_v3", "reference", ("reference_route_topk", "reference_experts")), ("qwen2_moe", "dense", ("dense_experts",))]
if TRITON_HERE:
    SWAPS.append(("gpt_oss", "triton", ("triton_route_topk", "triton_experts")))


@pytest.mark.parametrize("arch, backend, ops", SWAPS, ids=[f"{a}-{b}" for a, b, _ in SWAPS])
def test_swapped_model_compiles_fullgraph(arch, backend, ops, tmp_path):
    """Swapped routers and experts (routing kernels included) compile into one graph."""
    model = _load(build_tiny_model(arch, tmp_path / arch))
    inputs = _token_batches(4)
    with torch.no_grad():
        expected = model(inputs[0]).logits
    swap_moe_blocks(model, backend)
    outputs, code = _compiled_graphs(model, inputs, backend="eager")  # dynamo + the ops' fake kernels
    assert all(f"torch.ops.grape.{op}" in code for op in ops)
    torch.testing.assert_close(outputs[0], expected, rtol=1e-4, atol=1e-5)


# ---- no host synchronisation in the GPU launch path ----------------------------------------------
@pytest.mark.skipif(not TRITON_HERE, reason="Triton is not installed")
@pytest.mark.parametrize("spec", ROUTING_SPECS, ids=lambda s: f"{s.score_fn}-k{s.top_k}-g{s.n_group}")
def test_triton_launch_path_never_reads_tensor_values(spec, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    from grape_kernels.triton import fused_experts, route_topk

    launched = []
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, grid, warmup, **k: launched.append(self.__name__))
    meta = torch.device("meta")
    bias = None if spec.correction_bias is None else spec.correction_bias.to(meta)
    ids, weights = route_topk(torch.empty(300, 8, device=meta), dataclasses.replace(spec, correction_bias=bias))
    assert ids.device == meta and ids.shape == (300, spec.top_k)
    for gpt_oss in (False, True):
        hidden, layer, _, _ = _layer(0, gpt_oss=gpt_oss)
        layer = ExpertWeights(*(t.to(meta) if isinstance(t, torch.Tensor) else t for t in layer))
        out = fused_experts(torch.empty(300, hidden.shape[1], device=meta), layer, ids, weights)
        assert out.device == meta and out.shape == (300, hidden.shape[1])
    assert {"_route_kernel", "_count_kernel", "_prefix_kernel", "_place_kernel", "_gate_up_kernel", "_down_kernel",
            "_topk_sum_kernel"} <= set(launched)


HOST_READS = {"item", "tolist", "cpu", "numpy", "nonzero", "unique", "any", "all", "synchronize"}


@pytest.mark.parametrize("module", ["cuda_ops.py", "triton/routing.py", "triton/align.py", "triton/grouped_gemm.py",
                                    "triton/tuning.py", "kernel_checks.py", "library.py"])
def test_gpu_wrappers_call_nothing_that_reads_the_device(module):
    tree = ast.parse((PACKAGE / module).read_text())
    calls = {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert not calls & HOST_READS, f"{module} calls {sorted(calls & HOST_READS)}"
