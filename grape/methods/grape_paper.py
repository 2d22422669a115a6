"""``grape_paper``: GRAPE's Algorithm 1 as a third-party transcription describes it.

grape's own ``grape`` method (:mod:`grape.methods.grape`) fills in the published outline with
measured choices of its own. This module instead follows, step by step, a third-party
transcription of the paper's Algorithm 1, so the two can be compared on the same statistics.
The transcription is not the authors' code; where it is silent, the choice made here is
written down below and marked *choice*.

**The transcription.** Per layer a similarity block D over its experts (CKA or MSE of the
experts' outputs on the same tokens); the layer's redundancy R = the sum of D's off-diagonal
entries. Repeatedly pick the unfrozen layer with the largest R, merge its most similar pair of
experts and update R. After each merge recompute the entropy E of the per-layer expert counts
and freeze the layer when E falls below E0 * (1 - gamma), E0 being the entropy before any
merge; when every layer is frozen, unfreeze all.

**Similarity** [``similarity="cosine"``, default; ``"mse"``]. The statistics hold, for a
fixed sample of tokens on which every expert is evaluated, the summed output Gram matrix
G_ij = sum_t <o_i(t), o_j(t)>. From it:

- ``cosine``: D_ij = G_ij / sqrt(G_ii G_jj), the cosine between the two experts' outputs
  concatenated over the sampled tokens;
- ``mse``: D_ij = 1 - sum_t ||o_i - o_j||^2 / (G_ii + G_jj) = 2 G_ij / (G_ii + G_jj), the
  MSE normalised by the pair's output energy, so that it lies in [-1, 1] like the cosine and
  layers whose outputs have different scales compare. Unlike the cosine it also counts a
  difference in magnitude.

Linear CKA is not offered: it needs products of outputs on *different* tokens (the S x S
token kernels of each expert, or its H x H feature covariances), which the statistics do not
keep. Two experts with no output energy at all count as identical (D = 1); one silent expert
has similarity 0 to every other.

**Merge mode** (``merge=True``). A merged expert is modelled as what the surgery builds: the
routed-token-frequency-weighted average of its members, whose output is taken as the same
average of the members' outputs, o_c = sum_i a_i o_i (a linear model of a nonlinear merge,
which is all the statistics allow). Its similarities follow from G exactly: with cluster
coefficient rows A, the clusters' Gram matrix is A G A^T. The merged cluster keeps the router
row of its most frequently routed member (*choice*; the surgery keeps the target's row).

**Drop mode** (default). "Merge the pair" becomes: drop the member of the pair that was routed
fewer tokens (ties: the higher index) and keep the other unchanged (*choice*: the busier expert
stands in for the quieter one, which is also the merge target in merge mode).

**Layer choice and redundancy.** R_l = sum_{i != j} D_ij over the layer's current experts, as
transcribed. It grows with the number of experts (K(K-1) terms), so it favours layers that
still have many experts; the transcription says nothing about normalising it, so it is not.
Ties go to the lower layer index; the most similar pair ties to the lowest (i, j).

**Entropy guard** [``gamma``, default 0.05]. E = -sum_l p_l log p_l with p_l = n_l / sum n,
n_l the experts layer l has now; E0 is its value before pruning (log L for a uniform model).
The entropy of *counts* is insensitive: on 8 layers of 8 experts at a 50% budget, grape's own
allocation (5 2 3 3 4 4 6 5) is at E / E0 = 0.977, and even the collapsed allocation
8 8 8 8 2 2 2 2 is at 0.907. gamma = 0.05 lets allocations as ragged as the global methods'
through unhindered while freezing a layer whose merges head towards that collapse (*choice*:
the transcription gives no value; ``gamma=0.01`` is measured in the README). The layer just
merged is the one frozen; "every layer" means every layer that can still lose an expert, and
E0 is not reset when all are unfrozen (*choice*: the transcription does not reset it). Once E
stays below the threshold, every merge freezes its layer, so the layers then take turns in
order of R, which bounds how unequal the allocation can get.

**Budget and validity.** The total removed is the uniform budget's (as for every global
method). A layer never goes below its ``min_keep``. In group-limited layers one step merges the
most similar pair inside every group, so each group keeps the same count (*choice*: the
transcription has no groups); such a step is passed over when it is larger than what is left of
the budget.

``scores`` holds each expert's largest similarity to another expert of the unpruned layer;
``info`` the merge ``trace`` (layer, kept, removed, similarity, the layer's R before the
merge, the entropy ratio after it, whether the layer was frozen), the counts of freezes and
unfreezes, and the final entropy ratio. Everything is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from grape.budget import Budget, BudgetError, LayerLimits
from grape.methods.base import ExpertPruningMethod, Selection, register
from grape.stats import LayerStats

__all__ = ["GRAPEPaperMethod", "similarity_matrix"]

SIMILARITIES = ("cosine", "mse")


def similarity_matrix(gram: torch.Tensor, similarity: str) -> torch.Tensor:
    """(K, K) similarity D of outputs whose summed Gram matrix is ``gram`` (see module docs)."""
    gram = gram.double()
    energy = gram.diagonal().clamp_min(0)
    if similarity == "cosine":
        denom = (energy.unsqueeze(0) * energy.unsqueeze(1)).sqrt()
    elif similarity == "mse":
        denom = (energy.unsqueeze(0) + energy.unsqueeze(1)) / 2
    else:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    silent = energy == 0
    both_silent = silent.unsqueeze(0) & silent.unsqueeze(1)
    sim = torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1.0), 0.0)
    return torch.where(both_silent, 1.0, sim)


class _Layer:
    """One layer's current experts (clusters of original experts) and their similarities."""

    def __init__(self, stats: LayerStats, lim: LayerLimits, similarity: str, merge: bool) -> None:
        self.layer = stats.layer
        self.lim = lim
        self.similarity = similarity
        self.merge = merge
        self.gram = stats.gram.double()
        self.freq = stats.freq.double()
        num = lim.num_experts
        # Cluster k: its kept (representative) original expert, its members, its coefficients.
        self.rep = list(range(num))
        self.members: list[list[int]] = [[e] for e in range(num)]
        self.coef = torch.eye(num, dtype=torch.float64)
        self.group = [e // (num // lim.n_group) for e in range(num)]
        self.sim = similarity_matrix(self.gram, similarity)
        self.scores = [
            float(self.sim[e].masked_fill(torch.arange(num) == e, -math.inf).max()) if num > 1 else 0.0
            for e in range(num)
        ]

    @property
    def count(self) -> int:
        return len(self.rep)

    def can_step(self, remaining: int) -> bool:
        return self.count - self.lim.n_group >= self.lim.min_keep and self.lim.n_group <= remaining

    def redundancy(self) -> float:
        return float(self.sim.sum() - self.sim.diagonal().sum())

    def _best_pair(self, group: int) -> tuple[int, int, float]:
        """The most similar pair (i < j) of current clusters in ``group``; ties to the lowest."""
        best = None
        where = [k for k in range(self.count) if self.group[k] == group]
        for a, i in enumerate(where):
            for j in where[a + 1 :]:
                value = float(self.sim[i, j])
                if best is None or value > best[2]:
                    best = (i, j, value)
        return best

    def step(self) -> list[dict]:
        """Merge (or drop within) the most similar pair of every group; returns trace entries."""
        pairs = [self._best_pair(g) for g in range(self.lim.n_group)]
        entries, removed_positions = [], []
        for i, j, value in pairs:
            fi, fj = (float(self.freq[self.members[k]].sum()) for k in (i, j))
            keep, gone = (i, j) if (fi, -self.rep[i]) >= (fj, -self.rep[j]) else (j, i)
            entries.append({"kept": self.rep[keep], "removed": self.members[gone], "similarity": value})
            if self.merge:
                self.members[keep] = sorted(self.members[keep] + self.members[gone])
                weights = torch.zeros_like(self.freq)
                weights[self.members[keep]] = self.freq[self.members[keep]].clamp_min(1e-6)
                self.coef[keep] = weights / weights.sum()
            removed_positions.append(gone)
        survivors = [k for k in range(self.count) if k not in removed_positions]
        self.rep = [self.rep[k] for k in survivors]
        self.members = [self.members[k] for k in survivors]
        self.group = [self.group[k] for k in survivors]
        self.coef = self.coef[survivors]
        self.sim = similarity_matrix(self.coef @ self.gram @ self.coef.T, self.similarity)
        return entries


def _entropy(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c > 0)


@register
class GRAPEPaperMethod(ExpertPruningMethod):
    """The paper's Algorithm 1 as transcribed: most redundant layer first, entropy freezing."""

    name = "grape_paper"
    is_global = True
    default_options = {"similarity": "cosine", "gamma": 0.05}

    def __init__(self, *, merge: bool = False, seed: int = 0, **options) -> None:
        super().__init__(merge=merge, seed=seed, **options)
        if self.options["similarity"] not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.options['similarity']!r}")
        gamma = self.options["gamma"]
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")

    def _select(self, stats: Mapping[int, LayerStats], limits: Mapping[int, LayerLimits], budget: Budget) -> Selection:
        total = budget.global_total(limits)
        layers = {
            l: _Layer(stats[l], limits[l], self.options["similarity"], self.merge) for l in sorted(stats)
        }
        initial = _entropy([layer.count for layer in layers.values()])
        floor = initial * (1.0 - self.options["gamma"])
        frozen: set[int] = set()
        trace: list[dict] = []
        freezes = unfreezes = 0
        remaining = total
        while remaining > 0:
            candidates = [l for l, layer in layers.items() if layer.can_step(remaining)]
            if not candidates:
                raise BudgetError(f"cannot remove exactly {total} experts: {remaining} left once every layer reached its minimum")
            active = [l for l in candidates if l not in frozen]
            if not active:
                frozen.clear()
                unfreezes += 1
                active = candidates
            redundancy = {l: layers[l].redundancy() for l in active}
            chosen = max(active, key=lambda l: (redundancy[l], -l))
            entries = layers[chosen].step()
            remaining -= len(entries)
            entropy = _entropy([layer.count for layer in layers.values()])
            freeze = entropy < floor
            if freeze:
                frozen.add(chosen)
                freezes += 1
            ratio_now = entropy / initial if initial > 0 else None
            for entry in entries:
                trace.append(
                    {"layer": chosen, **entry, "redundancy": redundancy[chosen], "entropy_ratio": ratio_now, "frozen": freeze}
                )
        removed = {l: sorted(set(range(limits[l].num_experts)) - set(layer.rep)) for l, layer in layers.items()}
        merge_into = None
        if self.merge:
            merge_into = {
                l: {member: rep for rep, members in zip(layer.rep, layer.members) for member in members if member != rep}
                for l, layer in layers.items()
            }
        final = _entropy([layer.count for layer in layers.values()])
        return Selection(
            removed=removed,
            scores={l: layer.scores for l, layer in layers.items()},
            info={
                "source": "third-party transcription of the GRAPE paper's Algorithm 1",
                "total_removed": total,
                "trace": trace,
                "freezes": freezes,
                "unfreezes": unfreezes,
                "entropy_ratio": final / initial if initial > 0 else None,
            },
            merge_into=merge_into,
        )
