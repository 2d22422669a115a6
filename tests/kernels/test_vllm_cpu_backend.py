"""The optional ``vllm_cpu`` backend: vLLM's fused CPU kernel where it wins, grape's ``cpu`` elsewhere.

The kernel tests need vLLM's CPU build (the serve environment, ``$GRAPE_SERVE_VENV``, built by
``.ci/serve_env``); ``.ci/serve`` runs them there:
``$GRAPE_SERVE_VENV/bin/python -m pytest tests/kernels/test_vllm_cpu_backend.py``.
Elsewhere only the selection rules are checked.
"""

from __future__ import annotations

import pytest
import torch

from grape_kernels import ExpertWeights, backend_status
from grape_kernels.ops import cpu_prepack, reference_experts
from grape_kernels.ops import vllm_cpu as vllm_cpu_module

VLLM_HERE = vllm_cpu_module.vllm_cpu_ops() is not None
needs_vllm = pytest.mark.skipif(not VLLM_HERE, reason="vLLM's CPU build is not installed in this environment")
E, H, I, K = 6, 64, 96, 2  # H and I multiples of 32, as vLLM's kernel needs


def test_status_says_where_it_runs():
    ok, reason = backend_status("cpu")["vllm_cpu"]
    assert ok == VLLM_HERE and (ok or "vLLM" in reason)
    assert backend_status("meta")["vllm_cpu"][0] is False


def test_rule_follows_the_measurements():
    wins = vllm_cpu_module.vllm_wins
    assert wins(torch.float32) and not wins(torch.bfloat16) and not wins(torch.float16)


def _case(tokens: int, dtype: torch.dtype, seed: int = 0, hidden_size: int = H):
    g = torch.Generator().manual_seed(seed)
    w_gate_up = (torch.randn(E, 2 * I, hidden_size, generator=g) * 0.1).to(dtype)
    w_down = (torch.randn(E, hidden_size, I, generator=g) * 0.1).to(dtype)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    return hidden, ExpertWeights(w_gate_up, w_down), ids, torch.rand(tokens, K, generator=g)


@pytest.fixture
def kernel_calls(monkeypatch) -> list[str]:
    """The path each call took: ``vllm`` (vLLM's fused kernel) or ``cpu`` (grape's)."""
    calls: list[str] = []
    ops = vllm_cpu_module.vllm_cpu_ops()
    fused = ops.cpu_fused_moe
    monkeypatch.setattr(ops, "cpu_fused_moe", lambda *args: (calls.append("vllm"), fused(*args))[1])
    cpu = vllm_cpu_module.cpu_experts
    monkeypatch.setattr(vllm_cpu_module, "cpu_experts", lambda *args: (calls.append("cpu"), cpu(*args))[1])
    cpu_prepack.release_prepacked()
    yield calls
    cpu_prepack.release_prepacked()


@needs_vllm
@pytest.mark.parametrize(
    ("tokens", "dtype", "path"),
    [(1, torch.float32, "vllm"), (40, torch.float32, "vllm"), (3, torch.bfloat16, "cpu"), (1, torch.bfloat16, "cpu"),
     (40, torch.bfloat16, "cpu")],
)
def test_each_call_takes_the_measured_faster_path_and_matches_the_oracle(tokens, dtype, path, kernel_calls):
    hidden, weights, ids, topk = _case(tokens, dtype)
    out = vllm_cpu_module.vllm_cpu_experts(hidden, weights, ids, topk)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), reference_experts(hidden, weights, ids, topk).float(), rtol=tol, atol=tol)
    assert kernel_calls == [path]


@needs_vllm
def test_layers_the_kernel_does_not_cover_run_on_grape_cpu(kernel_calls):
    hidden, weights, ids, topk = _case(4, torch.float32, hidden_size=48)  # H not a multiple of 32
    expected = reference_experts(hidden, weights, ids, topk)
    torch.testing.assert_close(vllm_cpu_module.vllm_cpu_experts(hidden, weights, ids, topk), expected)
    biased = weights._replace(down_bias=torch.zeros(E, 48))
    torch.testing.assert_close(vllm_cpu_module.vllm_cpu_experts(hidden, biased, ids, topk), expected)
    assert kernel_calls == ["cpu", "cpu"]


@needs_vllm
def test_ids_out_of_range_are_refused_before_the_kernel(kernel_calls):
    hidden, weights, ids, topk = _case(4, torch.float32)
    ids[2, 1] = E
    with pytest.raises(ValueError, match="topk_ids must lie in"):
        vllm_cpu_module.vllm_cpu_experts(hidden, weights, ids, topk)
    assert kernel_calls == []
