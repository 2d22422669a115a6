"""The CPU backend's packed weight copies: used while valid, rebuilt when the weights change, budgeted."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from grape_kernels import ExpertWeights
from grape_kernels.ops import cpu_prepack, reference_experts
from grape_kernels.ops.cpu import cpu_experts
from grape_kernels.ops.cpu_native import native_ops

pytestmark = pytest.mark.skipif(not cpu_prepack.onednn_packing(), reason="this torch build has no oneDNN packing")

E, H, I, K = 6, 64, 96, 2


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv("GRAPE_CPU_PREPACK_GB", raising=False)
    cpu_prepack.release_prepacked()
    yield
    cpu_prepack.release_prepacked()


def _layer(seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    w_gate_up = torch.nn.Parameter((torch.randn(E, 2 * I, H, generator=g) * 0.1).to(dtype), requires_grad=False)
    w_down = torch.nn.Parameter((torch.randn(E, H, I, generator=g) * 0.1).to(dtype), requires_grad=False)
    return w_gate_up, w_down


def _inputs(tokens: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    return hidden, ids, torch.rand(tokens, K, generator=g)


def _check(w_gate_up, w_down, tokens: int, seed: int, dtype=torch.float32) -> None:
    hidden, ids, weights = _inputs(tokens, seed, dtype)
    layer = ExpertWeights(w_gate_up, w_down)
    expected = reference_experts(hidden, layer, ids, weights).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(cpu_experts(hidden, layer, ids, weights).float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_copies_are_made_once_and_match_the_oracle(tokens, dtype):
    w_gate_up, w_down = _layer(0, dtype)
    _check(w_gate_up, w_down, tokens, seed=1, dtype=dtype)
    packed = cpu_prepack.prepacked_bytes()
    # one token on these small experts runs GEMVs on the plain weights: in bfloat16 in both
    # loops, in float32 in the C++ one
    plain_decode = tokens == 1 and (dtype == torch.bfloat16 or native_ops() is not None)
    assert packed == (0 if plain_decode else (w_gate_up.numel() + w_down.numel()) * w_gate_up.element_size())
    _check(w_gate_up, w_down, tokens, seed=2, dtype=dtype)
    assert cpu_prepack.prepacked_bytes() == packed


@pytest.mark.parametrize(
    "edit",
    [
        "in_place",  # under no_grad: bumps the version counter
        "through_data",  # .data writes bypass the version counter; the sampled values catch them
        "one_expert_through_data",
        "new_parameter",  # a different storage
    ],
)
def test_changed_weights_are_packed_again(edit):
    w_gate_up, w_down = _layer(0)
    _check(w_gate_up, w_down, 8, seed=1)
    new_gate_up, _ = _layer(5)
    if edit == "in_place":
        with torch.no_grad():
            w_gate_up.copy_(new_gate_up)
    elif edit == "through_data":
        w_gate_up.data.copy_(new_gate_up)
    elif edit == "one_expert_through_data":
        w_gate_up.data[3].mul_(-2.0)
    else:
        w_gate_up = new_gate_up
    hidden, ids, weights = _inputs(8, 2)
    ids[:, 0] = 3  # every token uses the edited expert
    layer = ExpertWeights(w_gate_up, w_down)
    torch.testing.assert_close(cpu_experts(hidden, layer, ids, weights), reference_experts(hidden, layer, ids, weights))


def test_a_stale_copy_would_be_caught(monkeypatch):
    """The check above can fail: with validation disabled, an edited weight gives the old answer."""
    w_gate_up, w_down = _layer(0)
    _check(w_gate_up, w_down, 8, seed=1)
    monkeypatch.setattr(cpu_prepack, "_valid", lambda entry, weight: True)
    with torch.no_grad():
        w_gate_up.mul_(-1.0)
    with pytest.raises(AssertionError):
        _check(w_gate_up, w_down, 8, seed=1)


def test_copies_die_with_their_weights():
    w_gate_up, w_down = _layer(0)
    _check(w_gate_up, w_down, 8, seed=1)
    assert cpu_prepack.prepacked_bytes() > 0
    del w_gate_up, w_down
    gc.collect()
    assert cpu_prepack.prepacked_bytes() == 0


def test_budget_limits_packing_and_unpacked_layers_stay_correct(monkeypatch, caplog):
    layer_bytes = sum(w.numel() * w.element_size() for w in _layer(0))
    monkeypatch.setenv("GRAPE_CPU_PREPACK_GB", str(1.5 * layer_bytes / (1 << 30)))
    monkeypatch.setattr(cpu_prepack, "_warned_budget", False)
    first, second = _layer(0), _layer(1)
    _check(*first, 8, seed=1)
    assert cpu_prepack.prepacked_bytes() == layer_bytes
    with caplog.at_level(logging.WARNING, logger="grape_kernels.ops.cpu_prepack"):
        _check(*second, 8, seed=2)  # would pass the budget: runs on the plain weights
    assert cpu_prepack.prepacked_bytes() == layer_bytes
    assert "GRAPE_CPU_PREPACK_GB" in caplog.text

    monkeypatch.setenv("GRAPE_CPU_PREPACK_GB", "0")
    cpu_prepack.release_prepacked()
    _check(*first, 8, seed=3)
    assert cpu_prepack.prepacked_bytes() == 0


@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gpt_oss", [False, True], ids=["mixtral", "gpt_oss"])
def test_plain_weights_path_matches_the_oracle(tokens, dtype, gpt_oss, monkeypatch):
    """Packing disabled: the small-layer path (grouped_mm, ATen GEMV, addmm) on every layout."""
    monkeypatch.setenv("GRAPE_CPU_PREPACK_GB", "0")
    g = torch.Generator().manual_seed(tokens)
    shapes = ((E, H, 2 * I), (E, I, H)) if gpt_oss else ((E, 2 * I, H), (E, H, I))
    w_gate_up, w_down = ((torch.randn(shape, generator=g) * 0.1).to(dtype) for shape in shapes)
    flags = {}
    if gpt_oss:
        flags = dict(gate_up_bias=torch.randn(E, 2 * I, generator=g).to(dtype),
                     down_bias=torch.randn(E, H, generator=g).to(dtype),
                     activation="gpt_oss", swiglu_limit=1.5, transposed=True, interleaved=True)
    layer = ExpertWeights(w_gate_up, w_down, **flags)
    hidden, ids, weights = _inputs(tokens, tokens + 1, dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    expected = reference_experts(hidden, layer, ids, weights).float()
    torch.testing.assert_close(cpu_experts(hidden, layer, ids, weights).float(), expected, rtol=tol, atol=tol)
    assert cpu_prepack.prepacked_bytes() == 0


def test_bad_budget_setting_is_refused(monkeypatch):
    monkeypatch.setenv("GRAPE_CPU_PREPACK_GB", "lots")
    with pytest.raises(ValueError, match="GRAPE_CPU_PREPACK_GB"):
        cpu_prepack.prepack_budget_bytes()
