"""Exact layer-output error of re-routing, from the per-token output Gram matrices.

On a sampled token t the layer's routed output is y_t = sum_e w_te o_e(t). After removing
experts the pruned router picks other experts with other weights w'_t (exactly as
``grape_kernels.routing.route`` with a ``keep`` mask says), so the error is
||y_t - y'_t||^2 = d_t^T G_t d_t with d_t = w_t - w'_t and G_t the token's expert-output Gram.
No expert has to be re-run: the statistics already hold everything.

d_t is non-zero only on the union of the old and new top-k, so only a (2k x 2k) block of G_t is
read per token; that keeps one evaluation at O(S k^2) after routing, which matters because NAEE
and GRAPE's ``cost="reroute"`` evaluate thousands of candidate masks.
"""

from __future__ import annotations

import torch

from grape.stats import LayerStats
from grape_kernels.routing import route

__all__ = ["ReroutingError", "residual_energy"]


def residual_energy(stats: LayerStats) -> float:
    """Sum over sampled tokens of the energy that makes errors comparable across layers.

    The residual stream entering the block (``token_resid_sq``) is what an error in this layer's
    output perturbs, so errors divided by it are relative perturbations of the model's state and
    can be compared across layers whose output scales differ by orders of magnitude. 1.0 when it
    is zero (no sampled tokens: every error is zero then).
    """
    energy = float(stats.token_resid_sq.sum())
    return energy if energy > 0 else 1.0


class ReroutingError:
    """Layer-output error of routing the sampled tokens with only some experts kept."""

    def __init__(self, stats: LayerStats) -> None:
        self.stats = stats
        self._ids, self._weights = route(stats.token_logits, stats.spec)
        self._grams = stats.token_gram.double().reshape(-1)  # a view unless it must be copied

    def __call__(self, keep: torch.Tensor) -> float:
        """Sum over sampled tokens of ||y_t - y'_t||^2 when only experts ``keep`` (bool, E) stay."""
        stats = self.stats
        if stats.token_logits.shape[0] == 0:
            return 0.0
        ids, weights = route(stats.token_logits, stats.spec, keep)
        diff = torch.zeros(stats.token_logits.shape, dtype=torch.float64)
        diff.scatter_add_(1, self._ids, self._weights.double())
        diff.scatter_add_(1, ids, -weights.double())
        # Tokens whose routing did not change at all add nothing: skip them. (Sigmoid and
        # top-k-first routers leave every token that had no removed expert bitwise unchanged.)
        changed = diff.ne(0).any(1).nonzero().flatten()
        diff, old, ids = diff[changed], self._ids[changed], ids[changed]
        support = torch.cat([old, ids], dim=1)
        # An expert in both top-k sets must be counted once: zero its second copy.
        repeated = (ids.unsqueeze(-1) == old.unsqueeze(-2)).any(-1)
        coeff = diff.gather(1, support)
        coeff[:, old.shape[1]:] = coeff[:, old.shape[1]:].masked_fill(repeated, 0.0)
        # Read only the (2k x 2k) blocks, straight from the flattened Grams.
        num = diff.shape[1]
        pairs = support.unsqueeze(2) * num + support.unsqueeze(1)
        flat = changed.view(-1, 1, 1) * num * num + pairs
        block = self._grams[flat]
        return float(torch.einsum("ti,tij,tj->", coeff, block, coeff))
