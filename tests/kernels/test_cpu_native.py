"""The cpu backend's C++ loop (``grape_kernels.ops.cpu_native``): built where it can be, exact where it runs.

Its results are checked against a per-expert float64 loop written out here, with several
threads (the activation, the gather and the scatter-add split their work across threads, which
the one-thread tests of this directory never exercise) and with ids that repeat within a token
(two rows of one expert naming the same token: the scatter-add must not race).
"""

from __future__ import annotations

import logging
import platform
import shutil
import types

import pytest
import torch
from torch.nn import functional as F

from grape_kernels import ExpertWeights
from grape_kernels.ops import cpu_native, cpu_prepack
from grape_kernels.ops.cpu import cpu_experts

NATIVE = cpu_native.native_ops() is not None


def _oracle(hidden, w_gate_up, w_down, ids, weights, *, gpt_oss: bool, alpha=1.702, limit=7.0, biases=None):
    """Per (token, slot) in float64: the expert's gated MLP, weighted and summed."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    gate_up_bias, down_bias = biases or (torch.zeros(w_gate_up.shape[:2]), torch.zeros(w_down.shape[:2]))
    for t in range(hidden.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            gate_up = w_gate_up[e].double() @ hidden[t].double() + gate_up_bias[e].double()
            gate, up = gate_up.chunk(2)
            if gpt_oss:
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit) + 1
                h = gate * torch.sigmoid(alpha * gate) * up
            else:
                h = F.silu(gate) * up
            out[t] += float(weights[t, s]) * (w_down[e].double() @ h + down_bias[e].double())
    return out


def test_the_loop_builds_where_a_compiler_exists():
    """CI machines have g++ and ninja: there the C++ loop must load, or the fast path silently is not shipped."""
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja here: the Python loop runs")
    assert NATIVE, cpu_native.native_unavailable_reason()


@pytest.mark.skipif(not NATIVE, reason="the C++ loop is not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gpt_oss", [False, True], ids=["silu", "gpt_oss"])
def test_threads_and_repeated_ids_match_a_float64_loop(dtype, gpt_oss):
    g = torch.Generator().manual_seed(7 + gpt_oss)
    experts, hidden_size, inter, tokens = 5, 96, 80, 130
    w_gate_up = (torch.randn(experts, 2 * inter, hidden_size, generator=g) * 0.1).to(dtype)
    w_down = (torch.randn(experts, hidden_size, inter, generator=g) * 0.1).to(dtype)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(dtype)
    ids = torch.randint(0, experts, (tokens, 3), generator=g)
    ids[::4, 1] = ids[::4, 0]  # the same expert twice for every fourth token
    weights = torch.rand(tokens, 3, generator=g)
    layer = ExpertWeights(w_gate_up, w_down, activation="gpt_oss" if gpt_oss else "silu", swiglu_limit=1.0)
    expected = _oracle(hidden, w_gate_up, w_down, ids, weights, gpt_oss=gpt_oss, limit=1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with torch.no_grad():
            out = cpu_experts(hidden, layer, ids, weights)
    finally:
        torch.set_num_threads(threads)
    assert cpu_prepack.prepacked_bytes() > 0  # the packed copies, i.e. the C++ loop, were used
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    cpu_prepack.release_prepacked()


@pytest.mark.skipif(not NATIVE, reason="the C++ loop is not built here")
def test_non_finite_values_stay_non_finite():
    """NaN and Inf in the input reach the output as they do through transformers' own path (no clamp eats them)."""
    g = torch.Generator().manual_seed(3)
    w_gate_up, w_down = torch.randn(2, 64, 32, generator=g), torch.randn(2, 32, 32, generator=g)
    hidden = torch.randn(3, 32, generator=g)
    hidden[0, 0], hidden[2, 5] = float("nan"), float("inf")
    ids, weights = torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.full((3, 2), 0.5)
    with torch.no_grad():
        out = cpu_experts(hidden, ExpertWeights(w_gate_up, w_down), ids, weights)
    assert out[0].isnan().all() and out[1].isfinite().all() and not out[2].isfinite().all()
    cpu_prepack.release_prepacked()


def test_switched_off_or_unbuildable_it_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("GRAPE_CPU_NATIVE", "0")
    assert cpu_native._load.__wrapped__() == (None, "switched off by GRAPE_CPU_NATIVE=0")
    monkeypatch.delenv("GRAPE_CPU_NATIVE")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger=cpu_native.__name__):
        module, reason = cpu_native._load.__wrapped__()
    assert module is None and reason
    assert "using the Python loop" in caplog.text


@pytest.mark.skipif(not NATIVE or platform.machine() not in ("x86_64", "AMD64"), reason="needs the C++ loop on x86")
def test_the_portable_loop_without_avx512_matches_too(tmp_path, monkeypatch):
    """CPUs without AVX-512 (most laptops, AVX2 servers) compile only the portable scalar loops:
    built here with AVX-512 switched off, that variant meets the same float64 loop."""
    from torch.utils import cpp_extension

    from grape_kernels.ops import cpu as cpu_ops

    portable = cpp_extension.load(
        name="grape_cpu_native_portable", sources=[str(cpu_native._SOURCE)],
        extra_cflags=[*cpu_native._FLAGS, "-mno-avx512f"], build_directory=str(tmp_path),
    )  # fmt: skip
    monkeypatch.setattr(cpu_ops, "native_ops", lambda: portable)
    g = torch.Generator().manual_seed(11)
    for dtype, gpt_oss in ((torch.float32, False), (torch.bfloat16, True)):
        w_gate_up = (torch.randn(4, 2 * 40, 48, generator=g) * 0.1).to(dtype)
        w_down = (torch.randn(4, 48, 40, generator=g) * 0.1).to(dtype)
        hidden = torch.randn(9, 48, generator=g).to(dtype)
        ids, weights = torch.randint(0, 4, (9, 2), generator=g), torch.rand(9, 2, generator=g)
        layer = ExpertWeights(w_gate_up, w_down, activation="gpt_oss" if gpt_oss else "silu", swiglu_limit=1.0)
        with torch.no_grad():
            out = cpu_experts(hidden, layer, ids, weights)
        expected = _oracle(hidden, w_gate_up, w_down, ids, weights, gpt_oss=gpt_oss, limit=1.0)
        tol = 2e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    cpu_prepack.release_prepacked()


@pytest.mark.skipif(not NATIVE, reason="the C++ loop is not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_gemvs_on_odd_sizes_with_biases(dtype):
    """One token on small experts runs GEMVs on the plain weights (grape's own AVX-512 one in
    float32): sizes that fill no vector or row block evenly, with biases, meet the float64 loop."""
    g = torch.Generator().manual_seed(5)
    experts, hidden_size, inter = 3, 37, 29
    w_gate_up = (torch.randn(experts, 2 * inter, hidden_size, generator=g) * 0.2).to(dtype)
    w_down = (torch.randn(experts, hidden_size, inter, generator=g) * 0.2).to(dtype)
    biases = (torch.randn(experts, 2 * inter, generator=g).to(dtype), torch.randn(experts, hidden_size, generator=g).to(dtype))
    hidden = torch.randn(1, hidden_size, generator=g).to(dtype)
    ids, weights = torch.tensor([[2, 0]]), torch.tensor([[0.7, 0.3]])
    layer = ExpertWeights(w_gate_up, w_down, gate_up_bias=biases[0], down_bias=biases[1])
    with torch.no_grad():
        out = cpu_experts(hidden, layer, ids, weights)
    assert cpu_prepack.prepacked_bytes() == 0  # the plain-weight GEMVs, no packed copies
    expected = _oracle(hidden, w_gate_up, w_down, ids, weights, gpt_oss=False, biases=biases)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.skipif(not NATIVE, reason="the C++ loop is not built here")
def test_the_self_check_passes_the_build_and_catches_a_wrong_one():
    cpu_native._self_check(cpu_native.native_ops())
    wrong = types.SimpleNamespace(cpu_experts=lambda hidden, *args: torch.zeros_like(hidden))
    with pytest.raises(AssertionError, match="wrong results"):
        cpu_native._self_check(wrong)
