"""Every supported MoE architecture as one record: where its MoE parts live and how it routes.

This is the one table of architecture facts. Pruning (``grape``), the kernels' transformers
integration and the vLLM plugin all read it, so a new architecture is one :class:`MoEAdapter`
entry in :data:`ADAPTERS` plus its test fixture; nothing else switches on ``model_type``.

Every supported architecture in transformers 5.x stores a MoE block as a router (a module with
an (E, H) ``weight``, optionally an (E,) ``bias`` and an (E,) ``e_score_correction_bias``) plus
``experts`` (fused 3-D parameters whose first dimension is E) plus optional shared experts. A
record therefore holds names and routing rules; slicing is generic ("every tensor of the router
and the experts whose leading dimension is E"), which is what keeps surgery, the ragged modeling
file and the statistics identical across architectures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from grape_kernels.routing import ROUTING_MODES, RoutingSpec

__all__ = [
    "MoEAdapter",
    "UnsupportedModelError",
    "ADAPTERS",
    "get_adapter",
    "supported_model_types",
]


class UnsupportedModelError(ValueError):
    """The model is not a Mixture-of-Experts architecture grape knows how to handle."""


@dataclass(frozen=True)
class MoEAdapter:
    """Names and routing rules of one MoE architecture family.

    Attributes:
        name: human-readable family name (used in errors and reports).
        model_types: ``config.model_type`` values handled.
        count_key: config attribute holding the number of routed experts per layer.
        router_class: the transformers router class of the family (the kernels' router swap
            replaces only routers of this class, so a changed upstream class is refused, not
            routed with stale rules).
        routing_mode: one of :data:`grape_kernels.routing.ROUTING_MODES`: ``"softmax_topk"``,
            ``"topk_softmax"`` (top-k on logits, softmax over those, GPT-OSS) or
            ``"sigmoid_group"`` (sigmoid scores + correction bias + group-limited top-k,
            DeepSeek-V3).
        renormalize: whether the chosen weights are divided by their sum; None means the config's
            ``norm_topk_prob`` decides (Mixtral always renormalises, DeepSeek-V2 never does,
            whatever its config says).
        group_score: how group-limited routing scores a group: ``"max"`` (DeepSeek-V2) or
            ``"top2_sum"`` (DeepSeek-V3).
        float32_router_logits: the router computes its logits in float32 from float32 weights
            and ignores any router bias (DeepSeek) rather than in the model dtype.
        router_weights_in_logits_dtype: the router casts its top-k weights back to the logits'
            dtype (Qwen, OLMoE, GPT-OSS) instead of returning float32 (Mixtral, DeepSeek).
        block_attr: attribute of a decoder layer holding its MoE block (dense layers lack experts).
        router_attr: attribute of the MoE block holding the router.
        shared_attrs: attributes of the MoE block that are shared experts (never pruned).
        per_layer_config: whether a checkpoint may also carry its per-layer counts in
            transformers' heterogeneous ``per_layer_config``. False for MLA attention
            (DeepSeek): vLLM 0.32 refuses any heterogeneous MLA config
            ("Heterogeneous MLA models are not supported").
    """

    name: str
    model_types: tuple[str, ...]
    count_key: str
    router_class: str
    routing_mode: str = "softmax_topk"
    renormalize: bool | None = None
    group_score: str = "max"
    float32_router_logits: bool = False
    router_weights_in_logits_dtype: bool = True
    block_attr: str = "mlp"
    router_attr: str = "gate"
    shared_attrs: tuple[str, ...] = ()
    per_layer_config: bool = True

    def __post_init__(self) -> None:
        if self.routing_mode not in ROUTING_MODES:
            raise ValueError(f"{self.name}: routing_mode must be one of {ROUTING_MODES}, got {self.routing_mode!r}")

    # ---- model structure -------------------------------------------------------------------
    @staticmethod
    def decoder_layers(model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a ``*ForCausalLM`` (or its base model)."""
        base = getattr(model, "model", model)
        return base.layers

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's MoE block, or None for a dense layer (e.g. DeepSeek's first layers)."""
        block = getattr(layer, self.block_attr, None)
        if block is None or not hasattr(block, "experts"):
            return None
        return block

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def moe_layer_indices(self, config) -> list[int]:
        """Indices of decoder layers that carry routed experts, read from the config alone."""
        n_layers = config.num_hidden_layers
        first_dense = int(getattr(config, "first_k_dense_replace", 0) or 0)
        freq = int(getattr(config, "decoder_sparse_step", 1) or 1)
        only_dense = set(getattr(config, "mlp_only_layers", None) or [])
        return [
            i
            for i in range(n_layers)
            if i >= first_dense and (i + 1) % freq == 0 and i not in only_dense
        ]

    # ---- counts and constraints ------------------------------------------------------------
    def num_experts(self, config) -> int:
        return int(getattr(config, self.count_key))

    @staticmethod
    def top_k(config) -> int:
        return int(config.num_experts_per_tok)

    @staticmethod
    def n_group(config) -> int:
        """Number of expert groups of group-limited routing (1 when routing is not grouped)."""
        if getattr(config, "topk_method", "noaux_tc") == "greedy":
            return 1
        return int(getattr(config, "n_group", None) or 1)

    @staticmethod
    def topk_group(config) -> int:
        return int(getattr(config, "topk_group", 1) or 1)

    def min_experts(self, config) -> int:
        """Fewest routed experts a layer may keep and still route validly.

        At least top_k. With group-limited routing the kept experts must split evenly into the
        same ``n_group`` groups, the ``topk_group`` eligible groups must still offer top_k
        experts, and DeepSeek-V3's group score (sum of the best two) needs two per group.
        """
        k = self.top_k(config)
        groups = self.n_group(config)
        if groups == 1:
            return k
        per_group = max(-(-k // self.topk_group(config)), 2 if self.group_score == "top2_sum" else 1)
        return groups * per_group

    # ---- routing ---------------------------------------------------------------------------
    def routing_spec(self, config, router: nn.Module | None = None) -> RoutingSpec:
        """The layer's routing rule; ``router`` supplies the correction bias when it has one."""
        if self.routing_mode == "topk_softmax":
            return RoutingSpec(top_k=self.top_k(config), topk_before_softmax=True)
        bias = getattr(router, "e_score_correction_bias", None) if router is not None else None
        renormalize = self.renormalize
        if renormalize is None:
            renormalize = bool(getattr(config, "norm_topk_prob", self.routing_mode == "sigmoid_group"))
        return RoutingSpec(
            top_k=self.top_k(config),
            score_fn="sigmoid" if self.routing_mode == "sigmoid_group" else "softmax",
            renormalize=renormalize,
            scaling=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0),
            n_group=self.n_group(config),
            topk_group=self.topk_group(config),
            group_score=self.group_score,
            correction_bias=None if bias is None else bias.detach().float().cpu(),
        )

    def router_logits(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """(T, E) router logits for flattened hidden states, computed like the router does."""
        return self.logits_of_router(self.router(block), hidden)

    def logits_of_router(self, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`router_logits` for a router module itself (the kernels' router swap has no block)."""
        if self.float32_router_logits:
            return nn.functional.linear(hidden.float(), router.weight.float())
        return nn.functional.linear(hidden, router.weight, getattr(router, "bias", None))

    # ---- per-expert tensors ----------------------------------------------------------------
    def expert_modules(self, block: nn.Module) -> tuple[nn.Module, ...]:
        """Modules whose leading-E tensors are sliced together: the router and the experts."""
        return (self.router(block), block.experts)


ADAPTERS: tuple[MoEAdapter, ...] = (
    MoEAdapter(
        "Mixtral", ("mixtral",), count_key="num_local_experts", router_class="MixtralTopKRouter",
        renormalize=True, router_weights_in_logits_dtype=False,
    ),
    MoEAdapter(
        "Qwen2-MoE", ("qwen2_moe",), count_key="num_experts", router_class="Qwen2MoeTopKRouter",
        shared_attrs=("shared_expert", "shared_expert_gate"),
    ),
    MoEAdapter("Qwen3-MoE", ("qwen3_moe",), count_key="num_experts", router_class="Qwen3MoeTopKRouter"),
    MoEAdapter("OLMoE", ("olmoe",), count_key="num_experts", router_class="OlmoeTopKRouter"),
    MoEAdapter(
        "DeepSeek-V3", ("deepseek_v3",), count_key="n_routed_experts", router_class="DeepseekV3TopkRouter",
        routing_mode="sigmoid_group", group_score="top2_sum", float32_router_logits=True,
        router_weights_in_logits_dtype=False, shared_attrs=("shared_experts",), per_layer_config=False,
    ),
    MoEAdapter(
        "DeepSeek-V2", ("deepseek_v2",), count_key="n_routed_experts", router_class="DeepseekV2TopkRouter",
        renormalize=False, float32_router_logits=True, router_weights_in_logits_dtype=False,
        shared_attrs=("shared_experts",), per_layer_config=False,
    ),
    MoEAdapter(
        "GPT-OSS", ("gpt_oss",), count_key="num_local_experts", router_class="GptOssTopKRouter",
        routing_mode="topk_softmax", router_attr="router",
    ),
)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def get_adapter(config) -> MoEAdapter:
    """The adapter for ``config``, or a clear error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    names = ", ".join(f"{a.name} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a supported Mixture-of-Experts architecture. "
        f"Supported: {names}."
    )
