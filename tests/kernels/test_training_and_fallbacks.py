"""Training through grape, activations the kernels do not fuse, and routing edge cases.

Every model is a tiny random checkpoint saved with ``save_pretrained`` (``tests/tiny_models.py``)
and compared with transformers' own eager experts on the same weights: gradients parameter by
parameter, logits of GELU models, and the outputs of DeepSeek-V3's router when top_k exceeds the
experts of its chosen groups.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, build_tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

import grape_kernels
from grape_kernels import available_backends, swap_moe_blocks

SWAP_BACKENDS = ["auto", "cpu", "dense", "reference"] + (["triton"] if "triton" in available_backends("cpu") else [])


@pytest.fixture(autouse=True)
def _fresh_notices(monkeypatch):
    """Every test sees grape's one-time notices as if for the first time."""
    monkeypatch.setattr(grape_kernels.integration, "_noticed", set())


def _load(path: Path, implementation: str = "eager") -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, experts_implementation=implementation)


def _gradients(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Every parameter's gradient of the language-model loss on ``ids`` (train mode)."""
    model.train()
    model(ids, labels=ids).loss.backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_backend_gives_every_parameter_eager_gradient(arch, tmp_path, caplog):
    """Routers included: a swap that replaced the router by a kernel without autograd would leave
    the router's gradient None (training would silently not update it)."""
    path = build_tiny_model(arch, tmp_path / arch)
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = _gradients(_load(path), ids)
    assert any("gate" in name or "router" in name for name, grad in expected.items() if grad is not None)

    variants = {"experts_implementation=grape": _load(path, "grape")}
    for backend in SWAP_BACKENDS:
        variants[f"swap_moe_blocks({backend})"] = swap_moe_blocks(_load(path), backend)
    with caplog.at_level(logging.WARNING, logger="grape_kernels.integration"):
        for variant, model in variants.items():
            got = _gradients(model, ids)
            for name, grad in expected.items():
                if grad is None:
                    assert got[name] is None, f"{variant}: {name} got a gradient eager does not give"
                    continue
                assert got[name] is not None, f"{variant}: {name} has no gradient"
                scale = max(grad.abs().max().item(), 1e-6)
                assert (got[name] - grad).abs().max().item() <= 1e-4 * scale, f"{variant}: {name}"
    assert "inference-only" in caplog.text


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_gelu_experts_run_through_a_fallback_with_one_notice(arch, tmp_path, caplog):
    """transformers' own tiny test models use GELU experts; grape runs them (via grouped_mm), says so once."""
    path = build_tiny_model(arch, tmp_path / arch, hidden_act="gelu")
    ids = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _load(path).eval()(ids).logits
        with caplog.at_level(logging.WARNING, logger="grape_kernels.integration"):
            grape = _load(path, "grape").eval()
            got = grape(ids).logits
            grape(ids)
            swapped = swap_moe_blocks(_load(path).eval(), "cpu")(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(swapped, expected, rtol=1e-5, atol=1e-5)
    notices = [r.getMessage() for r in caplog.records if "GELU" in r.getMessage()]
    assert len(notices) == 2 and "grouped_mm" in notices[0], notices  # one per entry point, not per call


@pytest.fixture(scope="module")
def v3_top_k_beyond_groups(tmp_path_factory) -> Path:
    """DeepSeek-V3 with 4 groups of 2 experts, 1 group chosen, top-3: one slot always comes from
    outside the chosen group (transformers runs such configs)."""
    return build_tiny_model("deepseek_v3", tmp_path_factory.mktemp("v3"), n_group=4, topk_group=1,
                            num_experts_per_tok=3)


def test_grape_experts_run_v3_top_k_beyond_its_groups(v3_top_k_beyond_groups):
    ids = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = _load(v3_top_k_beyond_groups).eval()(ids).logits
        got = _load(v3_top_k_beyond_groups, "grape").eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in SWAP_BACKENDS if b in ("reference", "triton")])
def test_swapped_router_fills_slots_beyond_the_groups_like_transformers(backend, v3_top_k_beyond_groups):
    """The eligible experts and every weight follow transformers' router; the extra slot takes an
    expert outside the chosen group, as transformers does (which one is torch.topk's tie order
    there, the lowest id in grape)."""
    model = _load(v3_top_k_beyond_groups).eval()
    router = model.model.layers[-1].mlp.gate
    hidden = torch.randn(11, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, hf_weights, hf_ids = router(hidden)
        swap_moe_blocks(model, backend)
        assert "forward" in vars(router)
        logits, weights, ids = router(hidden)
    scores = logits.float().sigmoid()
    choice = (scores + router.e_score_correction_bias).view(-1, 4, 2)
    chosen_group = choice.topk(2, dim=-1).values.sum(-1).argmax(dim=-1)
    in_group = ids // 2 == chosen_group[:, None]
    assert torch.equal(in_group.sum(dim=1), torch.full((11,), 2)), "both experts of the chosen group"
    assert torch.equal((hf_ids // 2 == chosen_group[:, None]).sum(dim=1), torch.full((11,), 2))
    assert torch.equal(ids[:, 2], torch.where(chosen_group == 0, 2, 0)), "the lowest id outside it"
    expected = scores.gather(1, ids)
    expected = expected / (expected.sum(-1, keepdim=True) + 1e-20) * model.config.routed_scaling_factor
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    hf_expected = scores.gather(1, hf_ids)
    hf_expected = hf_expected / (hf_expected.sum(-1, keepdim=True) + 1e-20) * model.config.routed_scaling_factor
    torch.testing.assert_close(hf_weights, hf_expected, rtol=1e-5, atol=1e-6)
