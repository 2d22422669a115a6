"""Ragged grape checkpoints of every architecture, sized for vLLM's CPU kernels.

vLLM's CPU attention compiles only head sizes >= 32, its CPU MLA kernel (DeepSeek) only the
published latent size 512 + 64, and its CPU MoE kernel for GPT-OSS's clamped SwiGLU only expert
widths divisible by 32, so the tiny models of ``tests/tiny_models.py`` are widened here. The
DeepSeek configs also get the routing fields their published ``config.json`` files carry and
transformers' config classes leave out (V3: ``topk_method="noaux_tc"`` and
``scoring_func="sigmoid"``, without which vLLM builds no correction bias and routes by softmax;
V2-Lite: ``n_group = topk_group = 1``). DeepSeek-V2 gets three layers so that,
after its dense first layer, two MoE layers remain to differ. The checkpoints are made the way a user makes them: ``grape prune`` on a saved model.
To make the global budget land unevenly on random weights, the first MoE layer's router is
sharpened (a few of its experts take most of the routing mass) and the last one's flattened
(its experts all look equally used), so the global ranking removes experts from the first.
Grouped routing (DeepSeek-V3) removes whole group steps, and on some seeds the budget still
splits evenly; the first of a few fixed seeds that gives a ragged checkpoint is used.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import build_tiny_model, write_calibration_text

from grape.cli import main as grape_main

WIDE_HEADS = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
MLA_CPU = dict(
    hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
    kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
    qk_head_dim=96, head_dim=64,  # derived by the config class from the two above; set, not derived
)
VLLM_CPU_CONFIG = {
    "mixtral": WIDE_HEADS,
    "qwen2_moe": WIDE_HEADS,
    "qwen3_moe": WIDE_HEADS,
    "olmoe": WIDE_HEADS,
    "gpt_oss": WIDE_HEADS | {"intermediate_size": 32},
    "deepseek_v3": MLA_CPU | {"topk_method": "noaux_tc", "scoring_func": "sigmoid"},
    "deepseek_v2": MLA_CPU | {"num_hidden_layers": 3, "n_group": 1, "topk_group": 1},
}


def _skew_routers(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    blocks = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    with torch.no_grad():
        for block, scale in ((blocks[0], 4.0), (blocks[-1], 0.05)):
            router = getattr(block, "router", None) or block.gate
            router.weight.mul_(scale)
            if getattr(router, "bias", None) is not None:
                router.bias.mul_(scale)
    model.save_pretrained(model_dir)


def build_ragged_checkpoint(arch: str, directory: Path, *, seeds: tuple[int, ...] = (0, 2, 3)) -> Path:
    """``grape prune`` output of a random ``arch`` model whose MoE layers keep different counts."""
    for seed in seeds:
        out = _prune_tiny(arch, directory / f"seed{seed}", seed)
        counts = json.loads((out / "config.json").read_text())["grape_experts_per_layer"]
        if len({c for c in counts if c is not None}) > 1:
            return out
    raise RuntimeError(f"no seed of {seeds} gave a ragged tiny {arch} checkpoint (last: {counts})")


def _prune_tiny(arch: str, directory: Path, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny_model(arch, directory / "model", seed=seed, **VLLM_CPU_CONFIG[arch])
    _skew_routers(model_dir)
    calib = write_calibration_text(directory / "calib.txt")
    out = directory / "pruned"
    args = ["prune", str(model_dir), "--calib", str(calib), "--calib-samples", "8", "--seq-len", "32",
            "--method", "global_soft_activation", "--experts-ratio", "0.3", "--out", str(out)]
    if grape_main(args) != 0:
        raise RuntimeError(f"grape prune failed on the tiny {arch} model")
    return out
