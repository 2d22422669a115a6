"""``reap`` (Router-weighted Expert Activation Pruning): drop the experts whose gated output is
smallest on the tokens they serve.

It averages (rather than sums) over routed tokens, so a rarely routed expert that matters a lot
when chosen is kept, which ``ean`` and ``frequency`` would drop.
"""

from __future__ import annotations

import torch

from grape.methods.base import ScoreMethod, register
from grape.stats import LayerStats


@register
class REAPMethod(ScoreMethod):
    """Score = mean over routed tokens of routing weight x ||expert output||.

    An expert never routed scores 0 (its sum is 0 and the count is clamped to 1).
    """

    name = "reap"

    def score(self, stats: LayerStats) -> torch.Tensor:
        return stats.gated_out_norm_sum / stats.freq.clamp_min(1.0)
