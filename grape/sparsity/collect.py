"""Per-expert input statistics for MoE-Pruner and Wanda, accumulated in float64.

What a routed expert sees is captured at the exact point where the MoE block calls
``experts(hidden, top_k_index, top_k_weights)``: a stand-in for the experts' forward records
the tokens, the chosen expert ids and the routing weights *the layer itself computed*, so every
architecture's routing (softmax, top-k-then-softmax, sigmoid with groups and scaling) is used
as is, never re-implemented.

From the captured batches, :func:`input_stats` sums, per expert e and input column c, over the
tokens routed to e:

- ``gated_sq[e, c] = sum_t (g_te * x_tc)^2`` (MoE-Pruner),
- ``plain_sq[e, c] = sum_t x_tc^2`` (Wanda),

where x is gate_up_proj's input (the hidden state) or down_proj's input (the expert's
intermediate activation, see :func:`grape_kernels.architectures.expert_activation`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from grape.calibration.runner import NonFiniteActivationError

__all__ = ["RoutedBatch", "InputStats", "capture_routed_inputs", "input_stats"]


@dataclass
class RoutedBatch:
    """One batch of tokens at the experts' input: (T, H) states, (T, k) ids, (T, k) weights."""

    hidden: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor

    def routed(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices routed to ``expert`` and their routing weights (float64)."""
        token_idx, slot = torch.where(self.ids == expert)
        return token_idx, self.weights[token_idx, slot].to(torch.float64)


@dataclass
class InputStats:
    """Sums over routed tokens of squared inputs, per expert (E, in), plus token counts (E,)."""

    gated_sq: torch.Tensor
    plain_sq: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def zeros(cls, num_experts: int, in_features: int) -> InputStats:
        return cls(
            gated_sq=torch.zeros(num_experts, in_features, dtype=torch.float64),
            plain_sq=torch.zeros(num_experts, in_features, dtype=torch.float64),
            tokens=torch.zeros(num_experts, dtype=torch.int64),
        )

    def add(self, expert: int, inputs: torch.Tensor, gates: torch.Tensor) -> None:
        """Accumulate tokens ``inputs`` (T, in) routed to ``expert`` with routing weights (T,)."""
        x_sq = inputs.to(torch.float64).square_()
        self.plain_sq[expert] += x_sq.sum(dim=0)
        self.gated_sq[expert] += gates.to(torch.float64).square() @ x_sq
        self.tokens[expert] += x_sq.shape[0]

    def add_shared(self, batch: RoutedBatch) -> None:
        """Accumulate a batch whose inputs are the same for every expert (gate_up_proj's).

        One (E, T) x (T, in) product per statistic instead of a gather per expert: with dense
        (T, E) gate matrices, sum_t g_te^2 x_tc^2 = (G^2)^T (X^2) and the routed indicator
        gives the plain sum.
        """
        x_sq = batch.hidden.to(torch.float64).square_()
        gates = torch.zeros(x_sq.shape[0], self.tokens.numel(), dtype=torch.float64)
        gates.scatter_(1, batch.ids, batch.weights.to(torch.float64))
        routed = torch.zeros_like(gates).scatter_(1, batch.ids, 1.0)
        self.gated_sq += gates.square_().T @ x_sq
        self.plain_sq += routed.T @ x_sq
        self.tokens += routed.sum(dim=0).to(torch.int64)


@contextlib.contextmanager
def capture_routed_inputs(experts: nn.Module, *, layer: int) -> Iterator[list[RoutedBatch]]:
    """While active, ``experts`` records its inputs instead of computing (it returns zeros).

    Every call of the layer inside the ``with`` block appends one :class:`RoutedBatch` to the
    yielded list. Standing in for the expert computation (rather than observing it with a hook)
    skips the dense experts' work, which the statistics do not need; the layer's outputs are
    wrong while capturing and must be discarded.

    Raises:
        NonFiniteActivationError: a captured input holds NaN/Inf (names the layer).
    """
    batches: list[RoutedBatch] = []

    def stand_in(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args, **kwargs):
        if not (torch.isfinite(hidden).all() and torch.isfinite(top_k_weights).all()):
            raise NonFiniteActivationError(
                f"NaN/Inf in the routed experts' input of decoder layer {layer} during calibration"
            )
        batches.append(RoutedBatch(hidden.detach(), top_k_index.detach(), top_k_weights.detach()))
        return torch.zeros_like(hidden)

    previous = experts.__dict__.get("forward")  # an instance-level forward someone else installed
    experts.forward = stand_in
    try:
        yield batches
    finally:
        if previous is None:
            del experts.forward
        else:
            experts.forward = previous


def input_stats(
    batches: list[RoutedBatch],
    num_experts: int,
    in_features: int,
    features: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> InputStats:
    """Per-expert statistics of ``features(expert, routed hidden)`` (default: the hidden itself)."""
    stats = InputStats.zeros(num_experts, in_features)
    with torch.no_grad():
        for batch in batches:
            if features is None:
                stats.add_shared(batch)
                continue
            for expert in range(num_experts):
                token_idx, gates = batch.routed(expert)
                if token_idx.numel() == 0:
                    continue
                stats.add(expert, features(expert, batch.hidden[token_idx]), gates)
    return stats
