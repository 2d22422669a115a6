"""``random``: drop uniformly random experts; the floor every real criterion must beat."""

from __future__ import annotations

import torch

from grape.methods.base import ScoreMethod, register
from grape.stats import LayerStats


@register
class RandomMethod(ScoreMethod):
    """Random scores from a ``torch.Generator`` seeded with (seed, layer).

    Seeding per layer (rather than drawing layers in sequence) makes a layer's choice depend
    only on the seed and its index, so the same seed gives the same plan on any machine and
    whichever other layers are pruned; another seed gives another plan.
    """

    name = "random"

    def score(self, stats: LayerStats) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed << 20) + stats.layer)
        return torch.rand(stats.num_experts, generator=generator, dtype=torch.float64)
