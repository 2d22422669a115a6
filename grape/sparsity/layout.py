"""Expert weights seen as (out, in) matrices, whatever layout the architecture stores.

transformers keeps routed experts as fused 3-D tensors: ``gate_up_proj`` (E, 2I, H) and
``down_proj`` (E, H, I), i.e. (out, in) like ``nn.Linear``. GPT-OSS stores them transposed,
(E, H, 2I) and (E, I, H), and flags it with ``experts.is_transposed``. Scores and masks are
defined per output row, so every consumer goes through :func:`oriented`, which returns a *view*
(writes through it land in the stored tensor) of one expert's matrix as (out, in).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EXPERT_WEIGHTS", "oriented", "in_features"]

EXPERT_WEIGHTS: tuple[str, ...] = ("gate_up_proj", "down_proj")
"""The routed-expert matrices that sparsification prunes, in the order they are pruned."""


def oriented(experts: nn.Module, name: str, index: int) -> torch.Tensor:
    """Expert ``index``'s ``name`` matrix as an (out, in) view of the stored parameter data."""
    weight = getattr(experts, name).data[index]
    return weight.T if getattr(experts, "is_transposed", False) else weight


def in_features(experts: nn.Module, name: str) -> int:
    """Input width of ``name`` (hidden size for gate_up_proj, intermediate size for down_proj)."""
    shape = getattr(experts, name).shape
    return int(shape[1] if getattr(experts, "is_transposed", False) else shape[2])
