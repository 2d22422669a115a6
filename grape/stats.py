"""Per-expert calibration statistics of one MoE layer: the only input every criterion needs.

Collected once per (model, calibration data) and cached on disk, so re-running with another
method or budget skips all forward passes. Everything is float64 on the CPU: sums over many
tokens lose precision in lower types, and the tensors are tiny (E, E x E, or a token sample).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from grape_kernels.routing import RoutingSpec

__all__ = ["LayerStats"]


@dataclass
class LayerStats:
    """Statistics of one MoE layer over the calibration tokens.

    Attributes (E = routed experts in the layer, S = sampled tokens):
        layer: decoder layer index.
        num_tokens: calibration tokens seen by the layer.
        spec: the layer's routing rule (for re-routing after hypothetical removals).
        freq: (E,) tokens routed to each expert (top-k selections).
        soft_mass: (E,) sum over all tokens of the expert's router score (softmax/sigmoid).
        gate_mass: (E,) sum over routed tokens of the routing weight.
        out_norm_sum: (E,) sum over routed tokens of ||expert output|| (EAN).
        gated_out_norm_sum: (E,) sum over routed tokens of weight * ||expert output|| (REAP).
        gram: (E, E) sum over the S sampled tokens of <o_i(x), o_j(x)>: every expert evaluated
            on the same tokens, whether routed or not (output similarity, for GRAPE).
        token_logits: (S, E) router logits of the sampled tokens.
        token_gram: (S, E, E) per-token output Gram matrices of the sampled tokens: with them
            the layer-output error of any drop/merge set is (w - w')^T G_t (w - w') exactly.
        token_out_sq: (S,) squared norm of the layer's routed output on each sampled token.
        token_resid_sq: (S,) squared norm of the residual stream entering the MoE block on each
            sampled token: the normaliser that makes output errors comparable across layers.
    """

    layer: int
    num_tokens: int
    spec: RoutingSpec
    freq: torch.Tensor
    soft_mass: torch.Tensor
    gate_mass: torch.Tensor
    out_norm_sum: torch.Tensor
    gated_out_norm_sum: torch.Tensor
    gram: torch.Tensor
    token_logits: torch.Tensor
    token_gram: torch.Tensor
    token_out_sq: torch.Tensor
    token_resid_sq: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.freq.numel())

    def to_state(self) -> dict:
        """A dict of plain values and tensors for ``torch.save``."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "spec"}
        state["spec"] = asdict(self.spec)
        return state

    @classmethod
    def from_state(cls, state: dict) -> LayerStats:
        state = dict(state)
        state["spec"] = RoutingSpec(**state["spec"])
        return cls(**state)
