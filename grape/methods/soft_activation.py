"""``soft_activation``: drop the experts with the least router probability mass.

Unlike ``frequency`` this also credits an expert the router nearly chose (rank k+1), so it
separates experts that frequency counts as equally unused.
"""

from __future__ import annotations

import torch

from grape.methods.base import ScoreMethod, register
from grape.stats import LayerStats


@register
class SoftActivationMethod(ScoreMethod):
    """Score = sum over all calibration tokens of the expert's softmax/sigmoid router score."""

    name = "soft_activation"

    def score(self, stats: LayerStats) -> torch.Tensor:
        return stats.soft_mass
