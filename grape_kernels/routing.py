"""Router semantics of every supported architecture, as plain PyTorch on router logits.

This is the source of truth the routing kernels are tested against.

The transformers router modules compute routing from hidden states; pruning needs more than
that: the full score distribution (soft-activation criteria), and the routing a layer *would*
produce if some experts were removed (NAEE's reconstruction error, GRAPE's re-routing costs).
Both only need the router logits, so everything here is a function of logits plus a
:class:`RoutingSpec` that an architecture adapter reads off the model config.

Removing expert ``e`` from a layer is exactly equivalent to setting its logit to ``-inf``
before routing (for sigmoid routers: excluding it from the choice), which is what ``keep``
implements. Tests check this equivalence against real surgery.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "ROUTING_MODES",
    "MODE_CODES",
    "RoutingSpec",
    "routing_scores",
    "route",
    "dense_routing_weights",
    "kernel_mode",
    "kernel_spec",
]

ROUTING_MODES: tuple[str, ...] = ("softmax_topk", "topk_softmax", "sigmoid_group")
"""The routing rules the routing kernels implement (:func:`kernel_mode` of a :class:`RoutingSpec`):

- ``softmax_topk``: softmax over all logits, top-k of the probabilities (optionally renormalised),
  optionally group-limited with groups scored by their best probability and the probabilities
  outside the chosen groups zeroed (DeepSeek-V2's ``group_limited_greedy``);
- ``topk_softmax``: top-k of the logits, softmax over those k (GPT-OSS);
- ``sigmoid_group``: sigmoid scores, correction bias for the choice only, group-limited top-k
  with groups scored by their best two (DeepSeek-V3).

Group-limited routing with ``top_k`` above the experts of the chosen groups runs as in
transformers: the remaining slots go to experts outside the chosen groups, ranked after every
eligible one (weight: their sigmoid score for ``sigmoid_group``, zero for ``softmax_topk``).
transformers leaves *which* of them to ``torch.topk``'s tie order; :func:`route` and the
kernels take the lowest ids.
"""

MODE_CODES: dict[str, int] = {mode: code for code, mode in enumerate(ROUTING_MODES)}
"""The integer each mode is passed to the Triton and CUDA kernels as."""


@dataclass(frozen=True)
class RoutingSpec:
    """How one MoE layer turns router logits into (expert ids, weights).

    Attributes:
        top_k: experts chosen per token.
        score_fn: ``"softmax"`` (Mixtral, Qwen, OLMoE, DeepSeek-V2) or ``"sigmoid"`` (DeepSeek-V3).
        topk_before_softmax: GPT-OSS: choose the top-k *logits*, then softmax over those k.
        renormalize: divide the chosen weights by their sum (``norm_topk_prob``).
        scaling: ``routed_scaling_factor`` multiplied into the final weights.
        n_group / topk_group: group-limited routing (experts split into ``n_group`` contiguous
            groups, only the best ``topk_group`` groups are eligible). ``n_group == 1`` is off.
        group_score: how a group is scored: ``"max"`` (DeepSeek-V2) or ``"top2_sum"`` (V3).
        correction_bias: DeepSeek-V3 ``e_score_correction_bias`` (E,), added for the *choice*
            only, not to the weights.
    """

    top_k: int
    score_fn: str = "softmax"
    topk_before_softmax: bool = False
    renormalize: bool = False
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    correction_bias: torch.Tensor | None = None


def routing_scores(logits: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """Full per-expert score distribution (T, E) in float32: softmax or sigmoid of logits.

    This is the "soft activation" of an expert: the router mass it receives whether or not it
    is in the top-k. For GPT-OSS (top-k on logits) the softmax over all logits is used.
    """
    logits = logits.float()
    if spec.score_fn == "sigmoid":
        return logits.sigmoid()
    return logits.softmax(dim=-1)


def _group_mask(choice: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """Boolean (T, E) mask of experts in the ``topk_group`` best groups of each token."""
    tokens, num_experts = choice.shape
    per_group = num_experts // spec.n_group
    grouped = choice.view(tokens, spec.n_group, per_group)
    if spec.group_score == "top2_sum":
        group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    best = group_scores.topk(spec.topk_group, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return mask.unsqueeze(-1).expand(tokens, spec.n_group, per_group).reshape(tokens, num_experts)


def route(
    logits: torch.Tensor, spec: RoutingSpec, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids (T, k) and weights (T, k, float32) exactly as the architecture routes.

    Args:
        logits: (T, E) router logits.
        keep: optional bool (E,) mask; experts outside it can never be chosen, which equals
            routing in the layer after those experts were removed (ids stay in the original
            numbering).
    """
    if logits.dim() != 2:
        raise ValueError(f"router logits must be (tokens, experts), got {tuple(logits.shape)}")
    logits = logits.float()
    if keep is not None:
        if keep.numel() != logits.shape[-1]:
            raise ValueError(f"keep mask has {keep.numel()} entries for {logits.shape[-1]} experts")
        if int(keep.sum()) < spec.top_k:
            raise ValueError(f"keep mask leaves {int(keep.sum())} experts, fewer than top_k={spec.top_k}")
    neg_inf = torch.finfo(torch.float32).min

    if spec.topk_before_softmax:
        masked = logits if keep is None else logits.masked_fill(~keep, neg_inf)
        top_logits, ids = masked.topk(spec.top_k, dim=-1)
        weights = top_logits.softmax(dim=-1)
    else:
        scores = routing_scores(logits, spec)
        if keep is not None and spec.score_fn == "softmax":
            scores = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        choice = scores if spec.correction_bias is None else scores + spec.correction_bias.float()
        if keep is not None:
            choice = choice.masked_fill(~keep, neg_inf)
        if spec.n_group > 1:
            in_groups = _group_mask(choice, spec)
            choice = choice.masked_fill(~in_groups, neg_inf)
            if spec.score_fn == "softmax":  # DeepSeek-V2 zeroes the probabilities outside the groups
                scores = scores.masked_fill(~in_groups, 0.0)
        if spec.n_group > 1 and spec.top_k > spec.topk_group * (logits.shape[1] // spec.n_group):
            # Slots beyond the chosen groups' experts: the lowest ids among the rest, like the kernels.
            ids = choice.sort(dim=-1, descending=True, stable=True).indices[:, : spec.top_k]
        else:
            ids = choice.topk(spec.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if spec.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * spec.scaling


def dense_routing_weights(
    logits: torch.Tensor, spec: RoutingSpec, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Routing as a dense (T, E) float32 matrix: the weight of each expert, zero if not chosen."""
    ids, weights = route(logits, spec, keep)
    dense = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    return dense.scatter_(1, ids, weights)


def kernel_mode(spec: RoutingSpec) -> str:
    """The routing kernels' mode (one of :data:`ROUTING_MODES`) that computes ``spec``.

    Raises:
        ValueError: ``spec`` combines rules no routing kernel implements (naming the rule), so
            every routing backend refuses it the same way instead of routing differently.
    """
    if spec.score_fn not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown routing score_fn {spec.score_fn!r}; expected 'softmax' or 'sigmoid'")
    if spec.topk_before_softmax:
        if spec.score_fn != "softmax":
            raise ValueError("top-k before softmax (GPT-OSS) needs score_fn='softmax'")
        mode = "topk_softmax"
    else:
        mode = "sigmoid_group" if spec.score_fn == "sigmoid" else "softmax_topk"
    if spec.correction_bias is not None and mode != "sigmoid_group":
        raise ValueError(f"a correction bias is only used by sigmoid routing (DeepSeek-V3), not {mode!r}")
    if spec.n_group != 1:
        if mode == "topk_softmax":
            raise ValueError(f"group-limited routing (n_group={spec.n_group}) has no kernel for top-k before softmax")
        expected = "top2_sum" if mode == "sigmoid_group" else "max"
        if spec.group_score != expected:
            raise ValueError(
                f"group-limited {spec.score_fn} routing has a kernel for groups scored by {expected!r} "
                f"({'DeepSeek-V3' if mode == 'sigmoid_group' else 'DeepSeek-V2'}), not {spec.group_score!r}"
            )
    return mode


def kernel_spec(
    mode: str,
    top_k: int,
    *,
    renormalize: bool = False,
    scaling: float = 1.0,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
) -> RoutingSpec:
    """The :class:`RoutingSpec` of kernel ``mode`` (inverse of :func:`kernel_mode`).

    For callers who think in kernel modes (benchmarks, serving code that reads a mode from a
    config). ``renormalize`` is moot for ``topk_softmax`` (a softmax over k already sums to one).
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode {mode!r}; expected one of {ROUTING_MODES}")
    sigmoid = mode == "sigmoid_group"
    return RoutingSpec(
        top_k=top_k,
        score_fn="sigmoid" if sigmoid else "softmax",
        topk_before_softmax=mode == "topk_softmax",
        renormalize=renormalize and mode != "topk_softmax",
        scaling=scaling,
        n_group=n_group,
        topk_group=topk_group,
        group_score="top2_sum" if sigmoid else "max",
        correction_bias=correction_bias,
    )
