"""``reap`` (and ``ean`` beside it): a rarely routed but decisive expert is kept by REAP's mean."""

from __future__ import annotations

import torch

from grape.budget import Budget
from grape.methods import get_method
from grape_kernels.routing import RoutingSpec


def test_reap_keeps_a_rare_but_decisive_expert_that_ean_drops(from_outputs, make_limits):
    # Expert 3 is routed on 2 tokens only but with a large output; expert 1 is routed often
    # with a small output. EAN (a sum) drops 3, REAP (a mean, gate-weighted) drops 1.
    tokens = 64
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, 4, generator=gen)
    logits[:, 3] = -20.0
    logits[:2, 3] = 20.0
    outputs = torch.randn(tokens, 4, 6, generator=gen, dtype=torch.float64)
    outputs[:, 3] *= 3.0
    outputs[:, 1] *= 0.5
    stats = {0: from_outputs(outputs, logits, RoutingSpec(top_k=1))}
    limits = make_limits(stats)
    assert get_method("ean")().plan(stats, limits, Budget(keep_experts=3)).keep[0] == [0, 1, 2]
    assert get_method("reap")().plan(stats, limits, Budget(keep_experts=3)).keep[0] == [0, 2, 3]
