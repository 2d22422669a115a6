"""Tiny random MoE models of every supported architecture, saved to disk like real checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=128,
)


def tiny_config(arch: str):
    """A 2-layer config of ``arch`` with 8 routed experts, top-2 (grouped/shared where the arch has them)."""
    import transformers as tf

    if arch == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **COMMON, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        )
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, head_dim=8,
        )
    if arch == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    if arch == "deepseek_v3":
        return tf.DeepseekV3Config(
            **(COMMON | {"num_key_value_heads": 4}), intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        )
    if arch == "deepseek_v2":
        return tf.DeepseekV2Config(
            **(COMMON | {"num_key_value_heads": 4}), intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, topk_method="greedy",
        )
    if arch == "gpt_oss":
        return tf.GptOssConfig(
            **COMMON, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
            sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        )
    raise KeyError(arch)


ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2", "gpt_oss")


def build_tiny_model(
    arch: str, directory: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_changes
) -> Path:
    """Random ``arch`` model saved with ``save_pretrained`` (router/correction biases randomised).

    ``config_changes`` override attributes of :func:`tiny_config` (e.g. ``hidden_size=64``).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch)
    config.dtype = dtype
    for name, value in config_changes.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    randomize_moe_weights(model)
    model.save_pretrained(directory)
    save_tiny_tokenizer(directory)
    return directory


def randomize_moe_weights(model, bias_range: tuple[float, float] = (-0.1, 0.1)) -> None:
    """Spread routers and experts (N(0, 0.3)) so routing is decisive; correction biases uniform in ``bias_range``."""
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "experts" in name or "gate" in name or "router" in name:
                tensor.normal_(0.0, 0.3)
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:
                buf.uniform_(*bias_range)


SAMPLE_TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "The quick brown fox jumps over the lazy dog. Experts route tokens; routers pick experts.\n"
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n"
)


def save_tiny_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (vocab <= 300) trained on a fixed text, saved beside the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(directory)


def write_calibration_text(path: Path, repeats: int = 40) -> Path:
    """A text file long enough for a few short calibration samples."""
    path.write_text(SAMPLE_TEXT * repeats)
    return path


def save_checkpoint(lazy, out: Path, *, transform_layer, report: dict, overwrite: bool = False) -> dict:
    """Write ``lazy``'s model (each layer passed through ``transform_layer``) as a grape checkpoint
    at ``out``, through the same pipeline the commands use; ``report`` joins the written report."""
    from grape.pipeline import CommonOptions, Pipeline, run_pipeline

    class Transform(Pipeline):
        step = "test"

        def validate(self) -> None:
            pass

        def transform_layer(self, index, layer) -> None:
            transform_layer(index, layer)

        def report_sections(self) -> dict:
            return dict(report)

    return run_pipeline(Transform(CommonOptions(model=str(lazy.model_dir), out=str(out), overwrite=overwrite)))
