"""The one value every experts backend takes: the tensors and layout flags of one experts layer.

Every backend (``reference``, ``dense``, ``cpu``, ``triton``) computes the same function::

    backend(hidden (T, H), weights: ExpertWeights, topk_ids (T, k), topk_weights (T, k)) -> (T, H)

with ``weights.w_gate_up`` (E, 2I, H) and ``weights.w_down`` (E, H, I), or (E, H, 2I) /
(E, I, H) when ``weights.transposed`` (GPT-OSS). ``E`` is read from the weights on every call,
never from a config, because a pruned ("ragged") model has a different expert count in every
layer. Bundling the weights and their layout in one value keeps that contract in one place:
a new layout flag is one field here, not one more keyword in every backend.

:meth:`ExpertWeights.from_module` reads a transformers experts module; :func:`unsupported_reason`
says, without raising, why a module's math is one the kernels do not implement (the
transformers integration then runs transformers' own path instead).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "ExpertWeights", "UnsupportedExpertsError", "unsupported_reason"]

#: Gated activations the kernels fuse: ``silu(gate) * up`` and GPT-OSS's clamped SwiGLU.
ACTIVATIONS = ("silu", "gpt_oss")
_SILU_CLASSES = ("SiLU", "SiLUActivation")


class UnsupportedExpertsError(ValueError):
    """An experts module computes something the grape kernels do not implement."""


class ExpertWeights(NamedTuple):
    """The tensors and layout flags of one experts layer.

    A named tuple rather than a dataclass: the transformers integration builds one per layer
    call, and tuple construction is the cheapest immutable record Python has (torch.compile
    traces it too).

    Attributes:
        w_gate_up: (E, 2I, H) gate rows then up rows; (E, H, 2I) when ``transposed``.
        w_down: (E, H, I); (E, I, H) when ``transposed``.
        gate_up_bias / down_bias: optional (E, 2I) / (E, H) biases.
        activation: one of :data:`ACTIVATIONS`.
        swiglu_alpha / swiglu_limit: GPT-OSS's SwiGLU constants (unused by ``"silu"``).
        transposed: weights stored (in, out) per expert, as GPT-OSS does.
        interleaved: gate/up alternate along the 2I axis (gate even, up odd), as GPT-OSS does.
    """

    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    transposed: bool = False
    interleaved: bool = False

    @classmethod
    def from_module(cls, experts: nn.Module) -> ExpertWeights:
        """Read a transformers experts module (one decorated by ``use_experts_implementation``).

        The flags the decorator sets say how the weights are stored; the gated activation is
        identified from the module (GPT-OSS's clamped SwiGLU, or the default ``act_fn(gate) *
        up`` with SiLU).

        Raises:
            UnsupportedExpertsError: the module's math is not one the kernels implement (see
                :func:`unsupported_reason`), rather than computing it wrongly.
        """
        reason = unsupported_reason(experts)
        if reason is not None:
            raise UnsupportedExpertsError(reason)
        return cls.read_supported(experts)

    @classmethod
    def read_supported(cls, experts: nn.Module) -> ExpertWeights:
        """:meth:`from_module` for a module :func:`unsupported_reason` has already passed."""
        if _gate_kind(type(experts)) == "gpt_oss":
            activation, alpha, limit = "gpt_oss", float(experts.alpha), float(experts.limit)
        else:
            activation, alpha, limit = "silu", 1.702, 7.0
        has_bias = getattr(experts, "has_bias", False)
        return cls(
            experts.gate_up_proj,
            experts.down_proj,
            experts.gate_up_proj_bias if has_bias else None,
            experts.down_proj_bias if has_bias else None,
            activation,
            alpha,
            limit,
            getattr(experts, "is_transposed", False),
            not getattr(experts, "is_concatenated", True),
        )


def unsupported_reason(experts: nn.Module) -> str | None:
    """Why the kernels cannot compute ``experts`` (one line naming the module), or None if they can."""
    name = type(experts).__name__
    if getattr(experts, "gate_up_proj", None) is None or not getattr(experts, "has_gate", True):
        return f"{name} has no fused gate_up_proj; grape kernels need gated experts"
    if getattr(experts, "has_post_expert_norm", False):
        return f"{name} applies a post-expert norm, which grape kernels do not implement"
    if getattr(experts, "_is_expert_parallel", False):
        return f"{name} is expert-parallel; grape kernels need all experts local"
    gate = _gate_kind(type(experts))
    if gate == "custom":
        return f"{name} defines its own _apply_gate, which grape kernels do not implement"
    if gate == "default" and type(experts.act_fn).__name__ not in _SILU_CLASSES:
        return (
            f"{name} uses activation {type(experts.act_fn).__name__}; grape kernels implement "
            "SiLU-gated experts and GPT-OSS's clamped SwiGLU"
        )
    return None


_GATE_KINDS: dict[type, str] = {}


def _gate_kind(experts_class: type) -> str:
    """How a transformers experts class gates: ``"gpt_oss"``, ``"default"`` or ``"custom"``.

    ``use_experts_implementation`` installs ``_default_apply_gate`` (``act_fn(gate) * up``) on
    classes without their own; it is recognised by name and module so this file need not
    import transformers. Remembered per class (asked on every layer call) in a plain dict,
    which torch.compile can trace, unlike ``functools.cache``.
    """
    kind = _GATE_KINDS.get(experts_class)
    if kind is None:
        gate = getattr(experts_class, "_apply_gate", None)
        default = (getattr(gate, "__name__", None), getattr(gate, "__module__", None)) == (
            "_default_apply_gate",
            "transformers.integrations.moe",
        )
        if any(c.__name__ == "GptOssExperts" for c in experts_class.__mro__):
            kind = "gpt_oss"
        else:
            kind = "default" if default else "custom"
        _GATE_KINDS[experts_class] = kind
    return kind
