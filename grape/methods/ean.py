"""``ean`` (Expert Activation Norm): drop the experts that contribute the least output.

An expert routed often but producing near-zero outputs matters little to the layer; summing
its output norms over its routed tokens measures that contribution directly.
"""

from __future__ import annotations

import torch

from grape.methods.base import ScoreMethod, register
from grape.stats import LayerStats


@register
class EANMethod(ScoreMethod):
    """Score = sum over routed tokens of ||expert output||."""

    name = "ean"

    def score(self, stats: LayerStats) -> torch.Tensor:
        return stats.out_norm_sum
