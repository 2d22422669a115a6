"""Synthetic calibration statistics computed from real (random) expert outputs.

Every statistic is derived from one set of per-token expert outputs and router logits, the way
calibration derives them from a model, so the criteria see mutually consistent inputs and a
test can compare a method's choice with a brute-force answer computed from the outputs
themselves.
"""

from __future__ import annotations

import pytest
import torch

from grape.budget import LayerLimits
from grape.stats import LayerStats
from grape_kernels.routing import RoutingSpec, route, routing_scores


def stats_from_outputs(
    outputs: torch.Tensor,
    logits: torch.Tensor,
    spec: RoutingSpec,
    *,
    layer: int = 0,
    resid_sq: torch.Tensor | None = None,
) -> LayerStats:
    """LayerStats of one layer whose experts produce ``outputs`` (S, E, H) on all sampled tokens."""
    outputs = outputs.double()
    tokens, num, _ = outputs.shape
    ids, weights = route(logits, spec)
    dense = torch.zeros(tokens, num, dtype=torch.float64).scatter_(1, ids, weights.double())
    routed = torch.zeros(tokens, num, dtype=torch.float64).scatter_(1, ids, 1.0)
    norms = outputs.norm(dim=-1)
    token_gram = torch.einsum("teh,tfh->tef", outputs, outputs)
    layer_out = torch.einsum("te,teh->th", dense, outputs)
    values = dict(
        layer=layer,
        num_tokens=tokens,
        spec=spec,
        freq=routed.sum(0),
        soft_mass=routing_scores(logits, spec).double().sum(0),
        gate_mass=dense.sum(0),
        out_norm_sum=(norms * routed).sum(0),
        gated_out_norm_sum=(norms * dense).sum(0),
        gram=token_gram.sum(0),
        token_logits=logits.double(),
        token_gram=token_gram,
        token_out_sq=layer_out.square().sum(-1),
    )
    resid = resid_sq if resid_sq is not None else torch.full((tokens,), 100.0, dtype=torch.float64)
    return LayerStats(**values, token_resid_sq=resid)


def random_layer(
    num_experts: int = 8,
    *,
    tokens: int = 48,
    hidden: int = 12,
    top_k: int = 2,
    seed: int = 0,
    layer: int = 0,
    copies: dict[int, int] | None = None,
    never_routed: tuple[int, ...] = (),
    spec: RoutingSpec | None = None,
    out_scale: torch.Tensor | None = None,
) -> tuple[LayerStats, torch.Tensor]:
    """A layer with random outputs and logits; returns its stats and the outputs (S, E, H).

    ``copies`` maps expert -> expert whose outputs it repeats exactly; ``never_routed`` experts
    get logits so low that no token picks them; ``out_scale`` (E,) scales each expert's outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    outputs = torch.randn(tokens, num_experts, hidden, generator=gen, dtype=torch.float64)
    if out_scale is not None:
        outputs = outputs * out_scale.view(1, -1, 1)
    for expert, source in (copies or {}).items():
        outputs[:, expert] = outputs[:, source]
    logits = torch.randn(tokens, num_experts, generator=gen)
    for expert in never_routed:
        logits[:, expert] = -40.0
    spec = spec or RoutingSpec(top_k=top_k, renormalize=True)
    stats = stats_from_outputs(outputs, logits, spec, layer=layer)
    # A copy's Gram entries are equal mathematically; make them bitwise equal whatever BLAS does.
    for expert, source in (copies or {}).items():
        stats.token_gram[:, expert, :] = stats.token_gram[:, source, :]
        stats.token_gram[:, :, expert] = stats.token_gram[:, :, source]
    stats.gram = stats.token_gram.sum(0)
    return stats, outputs


def limits_for(stats: dict[int, LayerStats], n_group: int = 1, min_keep: int | None = None):
    """LayerLimits matching the stats: min_keep defaults to top_k."""
    return {
        layer: LayerLimits(s.num_experts, min_keep or s.spec.top_k, n_group)
        for layer, s in stats.items()
    }


@pytest.fixture
def make_layer():
    return random_layer


@pytest.fixture
def from_outputs():
    return stats_from_outputs


@pytest.fixture
def make_limits():
    return limits_for


@pytest.fixture(autouse=True)
def _one_thread():
    """Run on one thread: these tensors are tiny, and on a shared 2-core machine the thread
    pool's synchronisation on every small op costs more than the work (tests ran 5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
