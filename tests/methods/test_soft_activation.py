"""``soft_activation``: router mass separates experts that routing counts call equal."""

from __future__ import annotations

import torch

from grape.budget import Budget
from grape.methods import get_method
from grape_kernels.routing import RoutingSpec


def test_soft_activation_separates_experts_frequency_cannot(from_outputs, make_limits):
    # Experts 2 and 3 are never in the top-2; 2 is always third, 3 always last. Frequency sees
    # a tie at zero; soft activation knows 2 nearly made it.
    tokens = 32
    logits = torch.randn(tokens, 4) * 0.1
    logits[:, 0] += 6.0
    logits[:, 1] += 5.0
    logits[:, 2] += 4.0
    logits[:, 3] -= 4.0
    outputs = torch.randn(tokens, 4, 6, dtype=torch.float64)
    stats = {0: from_outputs(outputs, logits, RoutingSpec(top_k=2))}
    limits = make_limits(stats)
    assert stats[0].freq[2] == stats[0].freq[3] == 0
    plan = get_method("soft_activation")().plan(stats, limits, Budget(keep_experts=3))
    assert plan.keep[0] == [0, 1, 2]
