"""Importance scores of expert weights: MoE-Pruner, Wanda and magnitude, each a registered criterion.

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

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from grape.registry import Registry
from grape.sparsity.collect import InputStats

__all__ = ["WeightCriterion", "CRITERIA", "get_criterion"]


class WeightCriterion(ABC):
    """How important each weight of one expert matrix is; the lowest scores are pruned.

    Subclasses set ``name`` (the ``--method`` value) and ``needs_calibration`` (whether input
    statistics must be collected), and register with ``@CRITERIA.register``.
    """

    name: ClassVar[str]
    needs_calibration: ClassVar[bool]

    @abstractmethod
    def score(self, weight: torch.Tensor, stats: InputStats | None, expert: int) -> torch.Tensor:
        """(out, in) float64 scores of ``weight`` (out, in), given the expert's input statistics."""


CRITERIA: Registry[type[WeightCriterion]] = Registry("sparsification method")
"""Every weight-sparsity criterion, by ``grape sparsify --method`` name."""


def get_criterion(name: str) -> WeightCriterion:
    """An instance of the criterion registered as ``name`` (InputError listing the others)."""
    return CRITERIA.get(name)()


@CRITERIA.register
class Magnitude(WeightCriterion):
    name = "magnitude"
    needs_calibration = False

    def score(self, weight: torch.Tensor, stats: InputStats | None, expert: int) -> torch.Tensor:
        return weight.detach().to(torch.float64).abs()


class _ActivationWeighted(WeightCriterion):
    """|W_rc| * sqrt(statistic[expert, c]): a magnitude weighted by how much input column c carries."""

    needs_calibration = True
    statistic: ClassVar[str]

    def score(self, weight: torch.Tensor, stats: InputStats | None, expert: int) -> torch.Tensor:
        return Magnitude().score(weight, None, expert) * getattr(stats, self.statistic)[expert].sqrt().unsqueeze(0)


@CRITERIA.register
class MoEPruner(_ActivationWeighted):
    name = "moe_pruner"
    statistic = "gated_sq"  # sum over routed tokens of (router gate * input)^2


@CRITERIA.register
class Wanda(_ActivationWeighted):
    name = "wanda"
    statistic = "plain_sq"  # sum over routed tokens of input^2 (no gate)
