"""``frequency``: drop the experts the router picks least often (top-k selections)."""

from __future__ import annotations

import torch

from grape.methods.base import ScoreMethod, register
from grape.stats import LayerStats


@register
class FrequencyMethod(ScoreMethod):
    """Score = number of calibration tokens routed to the expert."""

    name = "frequency"

    def score(self, stats: LayerStats) -> torch.Tensor:
        return stats.freq
