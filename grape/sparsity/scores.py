"""Importance scores of expert weights: MoE-Pruner, Wanda and magnitude, behind one registry.

For an expert matrix W (out, in) and the tokens t routed to that expert:

- ``moe_pruner``: S_rc = |W_rc| * sqrt(sum_t (g_t * x_tc)^2), g_t the routing weight the layer
  gives the expert for token t. Tokens the router barely trusts count for little, because
  their contribution to the layer output is scaled by g_t anyway.
- ``wanda``: S_rc = |W_rc| * sqrt(sum_t x_tc^2) over the same routed tokens (g = 1).
- ``magnitude``: S_rc = |W_rc|; needs no calibration data.

Scores are float64: with bf16 weights and sums over tens of thousands of tokens, a lower
precision would create spurious ties and move the pruning threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from grape.sparsity.collect import InputStats

__all__ = ["ScoreMethod", "SCORE_METHODS", "get_score_method"]


@dataclass(frozen=True)
class ScoreMethod:
    """One pruning criterion.

    Attributes:
        name: the ``--method`` value.
        needs_calibration: whether input statistics must be collected.
        score: (W (out, in), stats of the expert's inputs or None, expert index) -> (out, in) float64.
    """

    name: str
    needs_calibration: bool
    score: Callable[[torch.Tensor, InputStats | None, int], torch.Tensor]


def _magnitude(weight: torch.Tensor, stats: InputStats | None, expert: int) -> torch.Tensor:
    return weight.detach().to(torch.float64).abs()


def _moe_pruner(weight: torch.Tensor, stats: InputStats | None, expert: int) -> torch.Tensor:
    return _magnitude(weight, None, expert) * stats.gated_sq[expert].sqrt().unsqueeze(0)


def _wanda(weight: torch.Tensor, stats: InputStats | None, expert: int) -> torch.Tensor:
    return _magnitude(weight, None, expert) * stats.plain_sq[expert].sqrt().unsqueeze(0)


SCORE_METHODS: dict[str, ScoreMethod] = {
    m.name: m
    for m in (
        ScoreMethod("moe_pruner", True, _moe_pruner),
        ScoreMethod("wanda", True, _wanda),
        ScoreMethod("magnitude", False, _magnitude),
    )
}


def get_score_method(name: str) -> ScoreMethod:
    """The registered method ``name``, or a ValueError listing the available ones."""
    try:
        return SCORE_METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown sparsification method {name!r}; choose one of {', '.join(SCORE_METHODS)}"
        ) from None
