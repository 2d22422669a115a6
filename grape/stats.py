"""Per-expert calibration statistics of one MoE layer: the only input every criterion needs.

Collected once per (model, calibration data) and cached on disk, so re-running with another
method or budget skips all forward passes. Everything is float64 on the CPU: sums over many
tokens lose precision in lower types, and the tensors are tiny (E, E x E, or a token sample).
Each per-token Gram matrix is one float32 product of H-long expert outputs (exact enough: the
outputs themselves are in the model's working dtype), summed and stored in float64.
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
    token_resid_sq: torch.Tensor

    @property
    def num_experts(self) -> int:
        return int(self.freq.numel())

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The statistics as plain data: named float64 tensors plus a JSON-able dict.

        This is what the on-disk cache stores (safetensors + JSON), so reading it back can never
        run code, whoever wrote the file.
        """
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        spec = asdict(self.spec)
        bias = spec.pop("correction_bias")
        if bias is not None:
            tensors["spec.correction_bias"] = bias.contiguous()
        return tensors, {"layer": self.layer, "num_tokens": self.num_tokens, "spec": spec}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], info: dict) -> LayerStats:
        """The inverse of :meth:`to_tensors`, checking every shape and dtype on the way.

        Raises:
            ValueError: a missing or unexpected field, or a tensor of the wrong shape or dtype.
        """
        tensors = dict(tensors)
        spec = dict(info["spec"])
        spec["correction_bias"] = tensors.pop("spec.correction_bias", None)
        unknown = sorted(set(tensors) - set(_TENSORS))
        if unknown:
            raise ValueError(f"unexpected tensors {unknown}")
        stats = cls(layer=int(info["layer"]), num_tokens=int(info["num_tokens"]), spec=RoutingSpec(**spec), **tensors)
        stats.check()
        return stats

    def check(self) -> None:
        """Raise ValueError unless every tensor is float64 with the shape its docstring says."""
        experts = self.num_experts
        samples = int(self.token_logits.shape[0]) if self.token_logits.dim() == 2 else -1
        expected = {
            "freq": (experts,), "soft_mass": (experts,), "gate_mass": (experts,), "out_norm_sum": (experts,),
            "gated_out_norm_sum": (experts,), "gram": (experts, experts), "token_logits": (samples, experts),
            "token_gram": (samples, experts, experts), "token_out_sq": (samples,), "token_resid_sq": (samples,),
        }  # fmt: skip
        for name, shape in expected.items():
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.float64 or tuple(value.shape) != shape:
                found = (value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} should be float64 of shape {shape}, found {found}")


_TENSORS = tuple(f.name for f in fields(LayerStats) if f.name not in ("layer", "num_tokens", "spec"))
