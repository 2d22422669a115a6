"""Calibration statistics against an independent reference: the checkpoint's own per-expert
tensors, evaluated token by token in float64 on the block inputs transformers' model produces."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_tiny_model

from grape.calibration.collect import collect_layer_stats
from grape.model_io import LazyCausalLM


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("mixtral", tmp_path_factory.mktemp("collect") / "model")


def _reference(model_dir, ids, layer):
    """Per-token expert outputs (T, E, H), routing (T, k) and softmax scores, from scratch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    captured = []
    handle = model.model.layers[layer].mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x = captured[0].reshape(-1, captured[0].shape[-1]).double()
    weights = load_file(model_dir / "model.safetensors")  # save_pretrained writes one tensor per expert
    prefix = f"model.layers.{layer}.block_sparse_moe"
    router = weights[f"{prefix}.gate.weight"].double()
    experts = router.shape[0]
    outputs = torch.zeros(x.shape[0], experts, x.shape[1], dtype=torch.float64)
    for e in range(experts):
        w1, w3, w2 = (weights[f"{prefix}.experts.{e}.{n}.weight"].double() for n in ("w1", "w3", "w2"))
        for t in range(x.shape[0]):
            outputs[t, e] = w2 @ (torch.nn.functional.silu(w1 @ x[t]) * (w3 @ x[t]))
    scores = (x @ router.T).softmax(-1)
    top, ids_top = scores.topk(2, dim=-1)
    return outputs, ids_top, top / top.sum(-1, keepdim=True), scores, x @ router.T


def test_statistics_match_a_token_by_token_reference(model_dir, tmp_path):
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    stats = collect_layer_stats(LazyCausalLM.open(model_dir), ids, sample_tokens=20, batch_size=2, cache_dir=tmp_path)
    for layer in (0, 1):
        outputs, top_ids, top_w, scores, logits = _reference(model_dir, ids, layer)
        s = stats[layer]
        routed = torch.zeros(scores.shape, dtype=torch.float64).scatter_(1, top_ids, 1.0)
        gates = torch.zeros(scores.shape, dtype=torch.float64).scatter_(1, top_ids, top_w)
        norms = outputs.norm(dim=-1)
        assert s.num_tokens == ids.numel()
        close = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.freq, routed.sum(0), rtol=0, atol=0)
        torch.testing.assert_close(s.soft_mass, scores.sum(0), **close)
        torch.testing.assert_close(s.gate_mass, gates.sum(0), **close)
        torch.testing.assert_close(s.out_norm_sum, (norms * routed).sum(0), **close)
        torch.testing.assert_close(s.gated_out_norm_sum, (norms * gates).sum(0), **close)
        assert s.token_logits.shape == (20, 8)
        for sample, row in enumerate(s.token_logits):  # find each sampled token by its logits
            t = int((logits - row).abs().sum(-1).argmin())
            torch.testing.assert_close(row, logits[t], **close)
            reference_gram = outputs[t] @ outputs[t].T  # float32 expert outputs inside grape: atol by scale
            torch.testing.assert_close(s.token_gram[sample], reference_gram, rtol=1e-4, atol=1e-5 * float(reference_gram.abs().max()))
        torch.testing.assert_close(s.gram, s.token_gram.sum(0), rtol=1e-12, atol=0)
    assert sorted(p.name for p in next(tmp_path.iterdir()).iterdir()) == ["layer_0000.safetensors", "layer_0001.safetensors"]
