"""Architecture adapters: where the MoE parts of a transformers model live and how they route.

Every supported architecture in transformers 5.x stores a MoE block as ``router`` (a module with
an (E, H) ``weight``, optionally an (E,) ``bias`` and an (E,) ``e_score_correction_bias``) plus
``experts`` (fused 3-D parameters whose first dimension is E) plus optional shared experts. An
adapter therefore only records names and routing semantics; slicing is generic ("every tensor of
the router and the experts whose leading dimension is E"), which is what keeps surgery, the
ragged modeling file and the statistics identical across architectures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from grape.routing import RoutingSpec

__all__ = [
    "MoEAdapter",
    "UnsupportedModelError",
    "ADAPTERS",
    "get_adapter",
    "supported_model_types",
]


class UnsupportedModelError(ValueError):
    """The model is not a Mixture-of-Experts architecture grape knows how to prune."""


@dataclass(frozen=True)
class MoEAdapter:
    """Names and routing rules of one MoE architecture family.

    Attributes:
        name: human-readable family name (used in errors and reports).
        model_types: ``config.model_type`` values handled.
        count_key: config attribute holding the number of routed experts per layer.
        block_attr: attribute of a decoder layer holding its MoE block (dense layers lack experts).
        router_attr: attribute of the MoE block holding the router.
        shared_attrs: attributes of the MoE block that are shared experts (never pruned).
    """

    name: str
    model_types: tuple[str, ...]
    count_key: str
    block_attr: str = "mlp"
    router_attr: str = "gate"
    shared_attrs: tuple[str, ...] = ()

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
        topk_group = int(getattr(config, "topk_group", 1) or 1)
        per_group = max(-(-k // topk_group), 2 if self.group_score(config) == "top2_sum" else 1)
        return groups * per_group

    def group_score(self, config) -> str:
        return "top2_sum" if self.routing_kind == "sigmoid" else "max"

    @property
    def routing_kind(self) -> str:
        return {
            "gpt_oss": "topk_softmax",
            "deepseek_v3": "sigmoid",
        }.get(self.model_types[0], "softmax")

    # ---- routing ---------------------------------------------------------------------------
    def routing_spec(self, config, router: nn.Module | None = None) -> RoutingSpec:
        """The layer's routing rule; ``router`` supplies the correction bias when it has one."""
        kind = self.routing_kind
        bias = getattr(router, "e_score_correction_bias", None) if router is not None else None
        if kind == "topk_softmax":
            return RoutingSpec(top_k=self.top_k(config), topk_before_softmax=True)
        if kind == "sigmoid":
            return RoutingSpec(
                top_k=self.top_k(config),
                score_fn="sigmoid",
                renormalize=bool(getattr(config, "norm_topk_prob", True)),
                scaling=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0),
                n_group=self.n_group(config),
                topk_group=int(getattr(config, "topk_group", 1) or 1),
                group_score="top2_sum",
                correction_bias=None if bias is None else bias.detach().float().cpu(),
            )
        # Mixtral always renormalises; DeepSeek-V2's router never does (whatever the config says).
        renormalize = {"mixtral": True, "deepseek_v2": False}.get(
            self.model_types[0], bool(getattr(config, "norm_topk_prob", False))
        )
        return RoutingSpec(
            top_k=self.top_k(config),
            renormalize=renormalize,
            scaling=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0),
            n_group=self.n_group(config),
            topk_group=int(getattr(config, "topk_group", 1) or 1),
            group_score="max",
        )

    def router_logits(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """(T, E) router logits for flattened hidden states, computed like the router does."""
        router = self.router(block)
        bias = getattr(router, "bias", None)
        if self.routing_kind == "sigmoid" or self.model_types[0] == "deepseek_v2":
            return nn.functional.linear(hidden.float(), router.weight.float())
        return nn.functional.linear(hidden, router.weight, bias)

    # ---- per-expert tensors ----------------------------------------------------------------
    def expert_modules(self, block: nn.Module) -> tuple[nn.Module, ...]:
        """Modules whose leading-E tensors are sliced together: the router and the experts."""
        return (self.router(block), block.experts)


def expert_activation(
    experts: nn.Module, index: int, x: torch.Tensor, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Input of expert ``index``'s down projection on tokens ``x`` (T, H): act(gate) * up.

    Generic over the layouts transformers uses (flags set by ``use_experts_implementation``):
    concatenated [gate; up] or interleaved gate/up columns, (out, in) or transposed (in, out)
    storage, optional biases, and the architecture's own ``_apply_gate`` (GPT-OSS's clamped
    SwiGLU). ``dtype`` computes in that type (e.g. float32 statistics of a bf16 model).
    """
    w_gate_up = experts.gate_up_proj[index]
    if dtype is not None:
        w_gate_up, x = w_gate_up.to(dtype), x.to(dtype)
    h = x @ w_gate_up if getattr(experts, "is_transposed", False) else nn.functional.linear(x, w_gate_up)
    if getattr(experts, "has_bias", False):
        h = h + experts.gate_up_proj_bias[index].to(h.dtype)
    return experts._apply_gate(h)


def expert_forward(experts: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """Output of routed expert ``index`` on tokens ``x`` (T, H), unweighted.

    Statistics and distillation both call this, so they see exactly the model's math.
    """
    h = expert_activation(experts, index, x)
    w_down = experts.down_proj[index]
    out = h @ w_down if getattr(experts, "is_transposed", False) else nn.functional.linear(h, w_down)
    if getattr(experts, "has_bias", False):
        out = out + experts.down_proj_bias[index]
    return out


ADAPTERS: tuple[MoEAdapter, ...] = (
    MoEAdapter("Mixtral", ("mixtral",), count_key="num_local_experts"),
    MoEAdapter(
        "Qwen2-MoE",
        ("qwen2_moe",),
        count_key="num_experts",
        shared_attrs=("shared_expert", "shared_expert_gate"),
    ),
    MoEAdapter("Qwen3-MoE", ("qwen3_moe",), count_key="num_experts"),
    MoEAdapter("OLMoE", ("olmoe",), count_key="num_experts"),
    MoEAdapter(
        "DeepSeek-V3", ("deepseek_v3",), count_key="n_routed_experts", shared_attrs=("shared_experts",)
    ),
    MoEAdapter(
        "DeepSeek-V2", ("deepseek_v2",), count_key="n_routed_experts", shared_attrs=("shared_experts",)
    ),
    MoEAdapter("GPT-OSS", ("gpt_oss",), count_key="num_local_experts", router_attr="router"),
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
