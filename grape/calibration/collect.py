"""Collect :class:`~grape.stats.LayerStats` for every MoE layer, with an on-disk cache.

For each MoE layer the block's input tokens are captured with a forward pre-hook while the
runner executes the layer. Routing ids and weights come from the model's own router module
(exactly what the model does); the full score distribution from the router logits. Every
expert is evaluated on the tokens routed to it (frequency, EAN, REAP sums) and, for a fixed
random sample of tokens, *every* expert is evaluated on the same tokens to build per-token
output Gram matrices: the raw material of GRAPE's redundancy and NAEE's reconstruction error.

Statistics are cached per layer under a key of (model weights, calibration ids, settings), so
an interrupted calibration resumes from the last finished layer and re-running with another
method or budget skips the expert evaluations (:mod:`grape.calibration.cache`: plain data,
verified on read).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from grape.calibration.cache import StatsCache, default_cache_dir, stats_cache_key
from grape.calibration.runner import NonFiniteActivationError, run_layerwise
from grape.model_io import LazyCausalLM
from grape.stats import LayerStats
from grape_kernels.architectures import MoEAdapter
from grape_kernels.experts_module import expert_forward
from grape_kernels.routing import routing_scores

__all__ = ["collect_layer_stats", "measure_layer"]

class _LayerStatsCollector:
    """Accumulates one MoE layer's statistics over the calibration batches."""

    def __init__(self, adapter: MoEAdapter, config, block: nn.Module, layer: int, sample_tokens: int, seed: int):
        self.adapter = adapter
        self.block = block
        self.layer = layer
        self.router = adapter.router(block)
        self.spec = adapter.routing_spec(config, self.router)
        self.num_experts = int(block.experts.num_experts)
        self.sample_tokens = sample_tokens
        self.generator = torch.Generator().manual_seed(seed * 1000003 + layer)
        e = self.num_experts
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.freq, self.soft_mass, self.gate_mass = zeros(e), zeros(e), zeros(e)
        self.out_norm_sum, self.gated_out_norm_sum, self.gram = zeros(e), zeros(e), zeros(e, e)
        self.num_tokens = 0
        self.samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._residual: torch.Tensor | None = None

    def residual_hook(self, _module, args):
        self._residual = args[0].detach().reshape(-1, args[0].shape[-1])

    def block_hook(self, _module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        self.observe(x, self._residual if self._residual is not None else x)

    def observe(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        experts = self.block.experts
        logits, weights, ids = self.router(x)
        logits = self.adapter.router_logits(self.block, x).float()
        weights = weights.float()
        self.num_tokens += x.shape[0]
        self.soft_mass += routing_scores(logits, self.spec).sum(0).double()
        self.freq += torch.bincount(ids.reshape(-1), minlength=self.num_experts).double()
        self.gate_mass.index_add_(0, ids.reshape(-1), weights.reshape(-1).double())
        for e in torch.unique(ids).tolist():
            token_idx, slot = torch.where(ids == e)
            norms = expert_forward(experts, e, x[token_idx]).float().norm(dim=-1).double()
            self.out_norm_sum[e] += norms.sum()
            self.gated_out_norm_sum[e] += (norms * weights[token_idx, slot].double()).sum()
        self._sample(x, residual, logits, ids, weights)

    def _sample(self, x, residual, logits, ids, weights) -> None:
        have = sum(s[0].shape[0] for s in self.samples)
        take = min(self.sample_tokens - have, x.shape[0])
        if take <= 0:
            return
        pick = torch.randperm(x.shape[0], generator=self.generator)[:take]
        outs = torch.stack(
            [expert_forward(self.block.experts, e, x[pick]).double() for e in range(self.num_experts)], dim=1
        )  # (S, E, H)
        token_gram = outs @ outs.transpose(1, 2)
        dense = torch.zeros(take, self.num_experts, dtype=torch.float64)
        dense.scatter_(1, ids[pick], weights[pick].double())
        routed = (dense.unsqueeze(-1) * outs).sum(1)
        self.gram += token_gram.sum(0)
        self.samples.append(
            (
                logits[pick].double(),
                token_gram,
                routed.pow(2).sum(-1),
                residual[pick].double().pow(2).sum(-1),
            )
        )

    def finish(self) -> LayerStats:
        logits, grams, out_sq, resid_sq = (torch.cat(parts) for parts in zip(*self.samples))
        sums = ("freq", "soft_mass", "gate_mass", "out_norm_sum", "gated_out_norm_sum", "gram")
        stats = LayerStats(
            layer=self.layer, num_tokens=self.num_tokens, spec=self.spec, token_logits=logits, token_gram=grams,
            token_out_sq=out_sq, token_resid_sq=resid_sq, **{name: getattr(self, name) for name in sums},
        )  # fmt: skip
        for name in ("freq", "soft_mass", "gram", "token_gram"):
            if not torch.isfinite(getattr(stats, name)).all():
                raise NonFiniteActivationError(
                    f"NaN/Inf in the expert statistics of decoder layer {self.layer} during calibration "
                    "(try --dtype float32, or check the layer's weights)"
                )
        return stats


def measure_layer(
    lazy: LazyCausalLM, index: int, layer: nn.Module, forward, *, sample_tokens: int, seed: int
) -> LayerStats:
    """Run ``forward()`` (the runner's layer forward) with hooks that measure layer ``index``."""
    block = lazy.adapter.moe_block(layer)
    collector = _LayerStatsCollector(lazy.adapter, lazy.config, block, index, sample_tokens, seed)
    handles = [block.register_forward_pre_hook(collector.block_hook)]
    norm = getattr(layer, "post_attention_layernorm", None)
    if norm is not None:
        handles.append(norm.register_forward_pre_hook(collector.residual_hook))
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return collector.finish()


def collect_layer_stats(
    lazy: LazyCausalLM,
    input_ids: torch.Tensor,
    *,
    sample_tokens: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    cache_dir: Path | None = None,
    use_cache: bool = True,
) -> dict[int, LayerStats]:
    """Statistics of every MoE layer of ``lazy`` on ``input_ids`` (cached on disk).

    Calibration runs on the original model (each layer sees the unpruned model's activations).
    With ``use_cache=False`` every layer is recomputed (and the cache refreshed).
    """
    moe_layers = lazy.adapter.moe_layer_indices(lazy.config)
    key = stats_cache_key(lazy, input_ids, sample_tokens=sample_tokens, batch_size=batch_size, seed=seed, sequential=False)
    cache = StatsCache(cache_dir or default_cache_dir(), key)
    results: dict[int, LayerStats] = {}
    if use_cache:
        for i in moe_layers:
            stats = cache.load(i)
            if stats is not None:
                results[i] = stats
    pending = [i for i in moe_layers if i not in results]
    if not pending:
        return results

    def visit(index: int, layer: nn.Module, _hidden, forward) -> None:
        stats = measure_layer(lazy, index, layer, forward, sample_tokens=sample_tokens, seed=seed)
        cache.save(stats)
        results[index] = stats

    run_layerwise(
        lazy,
        input_ids,
        visit,
        batch_size=batch_size,
        sequential=False,
        layers=pending,
        stop_after=max(pending),
        desc="calibrating",
    )
    return results
