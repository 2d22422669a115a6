"""Remove or merge routed experts of one MoE block in place.

Dropping keeps the listed experts: every per-expert tensor of the router and the experts
(router rows and bias, ``e_score_correction_bias``, fused 3-D weights, expert biases) is sliced
with the same index by :func:`grape_kernels.ragged_modeling.select_experts`, so the layer routes among
the kept experts exactly as if the removed ones had router logit -inf. Shared experts are
separate modules and are never touched. Kept indices stay in ascending order, which keeps
group-limited routing valid when each group keeps the same number of experts.

Merging first replaces each kept expert's weights by the frequency-weighted average of itself
and the experts merged into it (``f`` = routed-token counts, so an expert that served more
tokens dominates the average), then drops the merged-away experts. The router row of the kept
expert is kept unchanged: averaging router rows would move the decision boundary for tokens
that never used the removed experts.
"""

from __future__ import annotations

import torch
from torch import nn

from grape.errors import InputError
from grape_kernels.architectures import MoEAdapter
from grape_kernels.ragged_modeling import select_experts

__all__ = ["prune_block", "SurgeryError"]


class SurgeryError(InputError):
    """An invalid keep/merge plan for a layer."""


@torch.no_grad()
def prune_block(
    block: nn.Module,
    adapter: MoEAdapter,
    keep: list[int],
    *,
    merge_into: dict[int, int] | None = None,
    freq: torch.Tensor | None = None,
    min_keep: int = 1,
    n_group: int = 1,
) -> None:
    """Keep experts ``keep`` (original indices) of ``block``; optionally merge the others in first."""
    experts = block.experts
    num_experts = int(experts.num_experts)
    keep = sorted(int(k) for k in keep)
    if len(set(keep)) != len(keep) or not keep or keep[0] < 0 or keep[-1] >= num_experts:
        raise SurgeryError(f"keep list {keep} is not a set of expert indices in [0, {num_experts})")
    if len(keep) < min_keep:
        raise SurgeryError(f"keeping {len(keep)} experts leaves fewer than the minimum {min_keep}")
    if n_group > 1:
        per_group = num_experts // n_group
        counts = torch.bincount(torch.tensor(keep) // per_group, minlength=n_group)
        if not bool((counts == counts[0]).all()):
            raise SurgeryError(f"group-limited routing needs the same count kept in each of {n_group} groups, got {counts.tolist()}")
    if merge_into:
        _merge(experts, keep, merge_into, freq)
    if len(keep) == num_experts:
        return
    index = torch.tensor(keep, dtype=torch.long)
    select_experts(adapter.expert_modules(block), index, len(keep))


def _merge(experts: nn.Module, keep: list[int], merge_into: dict[int, int], freq: torch.Tensor | None) -> None:
    kept = set(keep)
    for source, target in merge_into.items():
        if target not in kept or source in kept:
            raise SurgeryError(f"cannot merge expert {source} into {target}: the target must be kept, the source removed")
    weights = torch.ones(int(experts.num_experts), dtype=torch.float64) if freq is None else freq.double().clamp_min(1e-6)
    groups: dict[int, list[int]] = {}
    for source, target in merge_into.items():
        groups.setdefault(target, [target]).append(source)
    for tensor in list(experts.parameters(recurse=False)):
        if tensor.dim() == 0 or tensor.shape[0] != experts.num_experts:
            continue
        for target, members in groups.items():
            w = weights[members]
            w = (w / w.sum()).to(torch.float32)
            mixed = (tensor[members].float() * w.view(-1, *([1] * (tensor.dim() - 1)))).sum(0)
            tensor[target] = mixed.to(tensor.dtype)
