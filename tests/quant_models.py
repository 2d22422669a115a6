"""Tiny checkpoints in the release formats: block-scaled FP8 (Qwen3-MoE, DeepSeek-V3) and MXFP4 (GPT-OSS).

They are written the way the releases are (``safetensors`` headers F8_E4M3 + F32
``weight_scale_inv`` per block, per-expert tensor names; U8 ``*_blocks``/``*_scales`` for GPT-OSS)
so that transformers' own loader and grape read the same bytes. The FP8 values come from a
plain float64 block quantizer written here, independent of ``grape.quant``; the MXFP4 bytes are
random codes with random exponents. Dimensions are multiples of the block size (16 x 16 for
FP8 here; 128 x 128 in the releases) wherever transformers needs that to dequantize correctly.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import randomize_moe_weights, save_tiny_tokenizer, tiny_config

FP8_BLOCK = (16, 16)
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}
MXFP4_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    "quant_method": "mxfp4",
}


def quant_config(arch: str):
    """A tiny config of ``arch`` whose quantized shapes are multiples of the 16 x 16 FP8 block (32 for MXFP4)."""
    config = tiny_config(arch)
    if arch == "qwen3_moe":
        config.moe_intermediate_size = 32
    elif arch == "deepseek_v3":
        # the release's structure: a dense first layer, q/kv low-rank attention, shared experts,
        # group-limited routing and one MTP layer after the last decoder layer
        config.num_hidden_layers = 3
        config.first_k_dense_replace = 1
        config.moe_intermediate_size = 32
        config.q_lora_rank = 16
        config.kv_lora_rank = 16
        config.qk_rope_head_dim = config.qk_nope_head_dim = config.v_head_dim = 16
        config.qk_head_dim = 32
        config.head_dim = 16
        config.num_nextn_predict_layers = 1
    elif arch == "gpt_oss":
        config.hidden_size = 64
        config.intermediate_size = 32
        config.head_dim = 16
    else:
        raise KeyError(arch)
    config.dtype = torch.bfloat16
    return config


def reference_fp8_block_quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F8_E4M3 weight, F32 weight_scale_inv)``: scale = block amax / 448 in float64, partial edge blocks included."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float64)
    padded[:rows, :cols] = weight.double()
    tiles = padded.view(grid[0], block[0], grid[1], block[1])
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-30).float()
    values = (tiles / scale.double()[:, None, :, None]).clamp(-448, 448).float().to(torch.float8_e4m3fn)
    return values.reshape(padded.shape)[:rows, :cols].contiguous(), scale


def _is_quantized_linear(key: str, value: torch.Tensor) -> bool:
    """What the FP8 releases quantize: every 2-D linear weight except embeddings, head, norms, routers and MTP glue."""
    if value.dim() != 2 or not key.endswith(".weight"):
        return False
    excluded = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "eh_proj", "shared_head")
    return not any(part in key for part in excluded)


def _random_model_tensors(config, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A random bfloat16 model of ``config`` as the tensors ``save_pretrained`` writes (per-expert names)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    # non-negative correction biases, so every choice score is positive: transformers fills the
    # experts of unselected groups with 0.0, which then never outranks one of a selected group
    randomize_moe_weights(model, bias_range=(0.0, 0.1))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors = load_file(str(Path(tmp) / "model.safetensors"))
        saved_config = json.loads((Path(tmp) / "config.json").read_text())
    return tensors, saved_config


def _mtp_layer(tensors: dict[str, torch.Tensor], config, seed: int) -> dict[str, torch.Tensor]:
    """DeepSeek's MTP layer ``model.layers.{N}``: a MoE decoder layer plus enorm/hnorm/eh_proj/shared_head/embed_tokens."""
    generator = torch.Generator().manual_seed(seed + 1)
    last, mtp = f"model.layers.{config.num_hidden_layers - 1}.", f"model.layers.{config.num_hidden_layers}."
    layer = {}
    for key, value in tensors.items():
        if key.startswith(last):
            if "norm" in key:
                fresh = torch.ones(value.shape)
            else:
                fresh = torch.randn(value.shape, generator=generator).mul(0.3 if "experts" in key else 0.05)
            layer[mtp + key.removeprefix(last)] = fresh.to(value.dtype)
    hidden = config.hidden_size
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        layer[mtp + name] = torch.ones(hidden, dtype=torch.bfloat16)
    layer[mtp + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=generator).mul(0.05).bfloat16()
    layer[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    layer[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    return layer


def _write(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), {"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_tiny_tokenizer(directory)
    return directory


def build_fp8_checkpoint(
    arch: str, directory: Path, *, seed: int = 0, block: tuple[int, int] = FP8_BLOCK, num_hidden_layers: int | None = None
) -> Path:
    """A random ``arch`` (qwen3_moe, deepseek_v3) checkpoint in the block-scaled FP8 release layout."""
    config = quant_config(arch)
    if num_hidden_layers is not None:
        config.num_hidden_layers = num_hidden_layers
    tensors, saved_config = _random_model_tensors(config, seed)
    if getattr(config, "num_nextn_predict_layers", 0):
        tensors |= _mtp_layer(tensors, config, seed)
    stored = {}
    for key, value in tensors.items():
        if _is_quantized_linear(key, value):
            stored[key], stored[f"{key}_scale_inv"] = reference_fp8_block_quantize(value, block)
        else:
            stored[key] = value
    saved_config["quantization_config"] = FP8_CONFIG | {"weight_block_size": list(block)}
    return _write(directory, stored, saved_config)


def build_mxfp4_checkpoint(directory: Path, *, seed: int = 0) -> Path:
    """A random GPT-OSS checkpoint in the MXFP4 release layout (random E2M1 codes, exponents 2**-8 .. 2**-1)."""
    config = quant_config("gpt_oss")
    tensors, saved_config = _random_model_tensors(config, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    stored = {}
    for key, value in tensors.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, cols, rows = value.shape  # transformers' (E, in, out) layout; the release stores (E, out, in/32, 16)
            stored[f"{key}_blocks"] = torch.randint(0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8, generator=generator)
            stored[f"{key}_scales"] = torch.randint(119, 127, (experts, rows, cols // 32), dtype=torch.uint8, generator=generator)
        else:
            stored[key] = value
    saved_config["quantization_config"] = dict(MXFP4_CONFIG)
    return _write(directory, stored, saved_config)


def mask_dropped_experts(model, arch: str, kept: dict[int, list[int]]) -> None:
    """Make the source's routers never choose a dropped expert (the reference for the pruned model)."""
    for layer_index, ids in kept.items():
        block = model.model.layers[layer_index].mlp
        router = block.router if arch == "gpt_oss" else block.gate
        mask = torch.full((router.weight.shape[0],), float("-inf"))
        mask[ids] = 0.0
        if arch == "gpt_oss":
            router.bias.data += mask
        elif arch == "deepseek_v3":
            router.e_score_correction_bias += mask
        else:
            def masked(hidden, router=router, mask=mask):  # Qwen3MoeTopKRouter.forward with the mask added
                logits = F.linear(hidden.reshape(-1, router.hidden_dim), router.weight) + mask
                top, index = torch.topk(F.softmax(logits, dtype=torch.float, dim=-1), router.top_k, dim=-1)
                top /= top.sum(dim=-1, keepdim=True)
                return logits, top.to(logits.dtype), index

            router.forward = masked
