"""DeepSeek-V3's multi-token-prediction (MTP) layer: what it is, who reads it, and grape's rule.

**The layer.** ``num_nextn_predict_layers: 1`` in config.json means the checkpoint holds one more
decoder layer after the last one, ``model.layers.{num_hidden_layers}`` (``model.layers.61`` in
DeepSeek-V3/R1): a full MoE decoder layer (MLA attention and 256 routed experts + the shared
expert, FP8 like the others) plus ``enorm``, ``hnorm``, ``eh_proj`` (BF16, 7168 x 14336),
``shared_head.norm``, ``shared_head.head`` and ``embed_tokens`` (BF16 copies of the main head
and embeddings): 11.5 B parameters besides the shared 0.9 B + 0.9 B.

**transformers 5.24.** The main model never loads it: ``DeepseekV3PreTrainedModel`` lists
``_keys_to_ignore_on_load_unexpected = [r"model\\.layers\\.61.*"]`` (``modeling_deepseek_v3.py``
l. 552; the number is hard-coded, so a checkpoint with another depth reports those tensors as
UNEXPECTED and still loads). ``generate(..., use_mtp=True)`` builds ``MtpModel`` (``modeling_layers.py``
l. 380-720) from ``config.get_mtp_config()`` (``configuration_utils.py`` l. 1596): one layer of the
main model's last layer class with ``first_k_dense_replace = 0`` and the config's scalar expert
count (``n_routed_experts``), and loads ``model.layers.61.*`` into it. Measured on an FP8
checkpoint loaded on CPU: the MTP layer's FP8 weights are loaded **without their scales** (raw
E4M3 codes cast to float, mean |w| 118 instead of 0.24), because the main model's weight
conversions, which carry the dequantization, are deleted when transformers dequantizes
(``quantizers/base.py`` l. 227-238) and ``MtpModel.get_weight_conversions`` (l. 637-657) falls
back to the unquantized mapping. Greedy tokens are unaffected (the main model verifies every
draft) but the draft is useless. That is upstream's bug; grape's output is correct for it.

**vLLM.** The main model skips ``model.layers.{num_hidden_layers + i}.*`` while loading
(``get_spec_layer_idx_from_weight_name`` in its DeepSeek model) and the ``deepseek_mtp``
speculative model loads them, also building its MoE from the config's ``n_routed_experts``.

**grape's rule.** Keep the MTP layer, whole: its tensors are copied byte for byte (never
dropped while ``num_nextn_predict_layers`` stays 1), its routed experts are not pruned, and the
config's scalar expert count stays the MTP layer's count (the source's), which is what both
transformers and vLLM build the MTP layer from; the pruned main layers carry their own counts
in ``grape_experts_per_layer``. Pruning the MTP layer's experts would force the scalar count to
its pruned value and a per-layer count for the MTP layer that neither reader has, to save at
most 1.7 % of DeepSeek-V3's parameters. Tests: ``tests/quant/test_quant_checkpoints.py``.
"""

from __future__ import annotations

import re

__all__ = ["is_mtp_tensor", "mtp_layer_indices", "scalar_expert_count"]


def mtp_layer_indices(config) -> range:
    """Indices of the checkpoint's MTP layers (``model.layers.{i}``); empty when it has none."""
    first = int(config.num_hidden_layers)
    return range(first, first + int(getattr(config, "num_nextn_predict_layers", 0) or 0))


def is_mtp_tensor(key: str, config) -> bool:
    """Whether checkpoint tensor ``key`` belongs to an MTP layer (copied whole by the writer)."""
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return match is not None and int(match.group(1)) in mtp_layer_indices(config)


def scalar_expert_count(counts: list[int | None], source_count: int, config) -> int:
    """The config's scalar routed-expert count for a pruned checkpoint with per-layer ``counts``.

    The largest layer's count, and never less than the (unpruned) MTP layer's ``source_count``
    when the checkpoint has an MTP layer, since its readers build it from the scalar count.
    """
    moe_counts = [c for c in counts if c is not None]
    if mtp_layer_indices(config):
        moe_counts.append(int(source_count))
    return max(moe_counts)
