"""transformers' implementation-equivalence check, made able to see a wrong-expert bug.

transformers' own suites compare each experts implementation with eager on their tiny models
(``_test_eager_matches_batched_and_grouped_inference``), but there the experts contribute so
little that sending every token to the wrong expert moves the logits by ~2e-7, far below the
check's tolerance. Here the same comparison (whole model, eager experts as the reference, same
dtype) runs with the expert weights scaled up, for every architecture, backend and dtype, and
each case proves it can fail: the same backend with every expert id shifted by one must move
the logits by more than ``WRONG_EXPERT_MIN_SHIFT`` and fail the tolerance.

The models have one MoE layer. With two, the second layer's router sees the first layer's
experts output, and in bfloat16 a rounding difference between two correct implementations can
flip a near-tied routing choice there; with experts this strong one flip moves the logits by
0.3, which would fail a correct backend (measured: the float32-accumulating oracle on Qwen2-MoE).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, tiny_config

import grape_kernels
from grape_kernels import available_backends, swap_moe_blocks

transformers = pytest.importorskip("transformers")

#: Expert weights are multiplied by this after transformers' init (std 0.02): measured, it makes a
#: shifted-id bug move these models' logits by 0.25-0.65 in float32 and bfloat16.
EXPERT_SCALE = 20.0
#: |logits - eager logits| allowed, per dtype; bf16 logits of ~0.5 are spaced 2e-3 apart.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
WRONG_EXPERT_MIN_SHIFT = 0.1

_TRITON = "triton" in available_backends("cpu")
# "grape": the experts implementation (backend chosen by device); then every backend by name.
_NATIVE = ["grape"] + [b for b in available_backends("cpu") if b != "triton"]
CASES = [(backend, dtype) for backend in _NATIVE for dtype in (torch.float32, torch.bfloat16)]
# The Triton interpreter computes bfloat16 wrongly (see DESIGN.md); it is checked in float16 here.
CASES += [pytest.param("triton", dtype, marks=[pytest.mark.interpreter, pytest.mark.skipif(not _TRITON, reason="needs TRITON_INTERPRET=1 or CUDA")])
          for dtype in (torch.float32, torch.float16)]


def _config(arch: str):
    """The architecture's tiny config cut to its dense layers (if any) and one MoE layer."""
    config = tiny_config(arch)
    config.num_hidden_layers = getattr(config, "first_k_dense_replace", 0) + 1
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    return config


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    """Per architecture, the state of one tiny model with its expert weights scaled up."""
    states = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(arch))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".experts." in name:
                    param.mul_(EXPERT_SCALE)
        states[arch] = model.state_dict()
    return states


def _model(arch: str, state: dict[str, torch.Tensor], dtype: torch.dtype, implementation: str):
    model = transformers.AutoModelForCausalLM.from_config(_config(arch), experts_implementation=implementation)
    model.load_state_dict(state)
    return model.to(dtype).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _run_on(backend: str, model):
    """Put ``model`` on ``backend``: the ``grape`` implementation (backend by device) or a pinned one."""
    if backend == "grape":
        model.set_experts_implementation("grape")
    else:
        swap_moe_blocks(model, backend)
    return model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("backend", "dtype"), CASES)
def test_backend_matches_eager_and_a_wrong_expert_would_not(arch, backend, dtype, weights, monkeypatch):
    ids = torch.randint(0, 320, (2, 5 if backend == "triton" else 9), generator=torch.Generator().manual_seed(1))
    expected = _logits(_model(arch, weights[arch], dtype, "eager"), ids)
    model = _run_on(backend, _model(arch, weights[arch], dtype, "eager"))
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=tolerance)

    real = grape_kernels.integration.experts_forward

    def shifted(weights_, hidden, topk_ids, topk_weights, **kwargs):
        return real(weights_, hidden, (topk_ids + 1) % weights_.w_gate_up.shape[0], topk_weights, **kwargs)

    monkeypatch.setattr(grape_kernels.integration, "experts_forward", shifted)
    wrong = _logits(model, ids)
    assert (wrong - expected).abs().max().item() > max(WRONG_EXPERT_MIN_SHIFT, 10 * tolerance)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(wrong, expected, rtol=0, atol=tolerance)
