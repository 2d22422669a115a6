"""Collect :class:`~grape.stats.LayerStats` for every MoE layer, with an on-disk cache.

For each MoE layer, calibration stands in for the block's experts module while the runner
executes the layer: it receives the block's inputs with the ids and weights the model's own
router chose (exactly what the model does; the full score distribution comes from the router
logits). Every expert is evaluated on the tokens routed to it (frequency, EAN, REAP sums, and
the block's routed output, computed once for both) and, for a fixed random sample of tokens,
*every* expert is evaluated on the same tokens to build per-token output Gram matrices: the raw
material of GRAPE's redundancy and NAEE's reconstruction error. The routed experts are read in
groups that fit the memory budget (:mod:`grape.calibration.memory_plan`, :func:`measure_layer`).

Statistics are cached per layer under a key of (model weights, calibration ids, settings), so
an interrupted calibration resumes from the last finished layer and re-running with another
method or budget skips the expert evaluations (:mod:`grape.calibration.cache`: plain data,
verified on read).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from grape.calibration.cache import StatsCache, default_cache_dir, stats_cache_key
from grape.calibration.memory_plan import GRAM_CHUNK_BYTES, LayerMemory, experts_per_group, kept_statistics_bytes
from grape.calibration.runner import NonFiniteActivationError, run_layerwise
from grape.memory import memory_budget, resident_bytes
from grape.model_io import LazyCausalLM
from grape.stats import LayerStats
from grape_kernels.architectures import MoEAdapter
from grape_kernels.experts_module import expert_forward
from grape_kernels.routing import routing_scores

__all__ = ["collect_layer_stats", "measure_layer", "layer_memory"]


@dataclass
class _Batch:
    """One calibration batch as the MoE block's experts module received it, plus its sampled tokens."""

    x: torch.Tensor  # (T, H) experts input
    ids: torch.Tensor  # (T, k) routed experts
    weights: torch.Tensor  # (T, k) routing weights, as the block passes them
    pick: torch.Tensor  # (s,) sampled token positions
    sample_out: torch.Tensor  # (s, E, H) every expert's output on the sampled tokens, working dtype
    routed: torch.Tensor  # (T, H) float32 sum of the weighted routed outputs, filled group by group


class _LayerStatsCollector:
    """Accumulates one MoE layer's statistics over the calibration batches, one group of experts at a time.

    :meth:`route` takes what the block hands its experts module (inputs, routed ids and
    weights: the model's own routing); :meth:`run_group` evaluates a materialised group of
    experts on their routed tokens (output norms, the block's routed output) and on the sampled
    tokens (every expert on the same tokens: GRAPE's output Gram matrices). The routed outputs
    are computed once and serve both the statistics and the layer's output, which is what the
    model's own experts forward computes (weighted outputs summed in float32).
    """

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
        self.out_norm_sum, self.gated_out_norm_sum = zeros(e), zeros(e)
        self.num_tokens = 0
        self.batches: list[_Batch] = []
        self.samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # logits, dense weights, residual^2
        self._residual: torch.Tensor | None = None

    def residual_hook(self, _module, args):
        self._residual = args[0].detach().reshape(-1, args[0].shape[-1])

    def route(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> _Batch:
        """Routing statistics of one batch; chooses its sampled tokens (a fixed random sample)."""
        residual = self._residual if self._residual is not None and self._residual.shape[0] == x.shape[0] else x
        logits = self.adapter.router_logits(self.block, x).float()
        gates = weights.float()
        flat_ids = ids.reshape(-1).cpu()  # the sums live on the CPU whatever the device
        self.num_tokens += x.shape[0]
        self.soft_mass += routing_scores(logits, self.spec).sum(0).double().cpu()
        self.freq += torch.bincount(flat_ids, minlength=self.num_experts).double()
        self.gate_mass.index_add_(0, flat_ids, gates.reshape(-1).double().cpu())
        have = sum(b.pick.numel() for b in self.batches)
        take = min(self.sample_tokens - have, x.shape[0])
        pick = torch.randperm(x.shape[0], generator=self.generator)[:take] if take > 0 else torch.zeros(0, dtype=torch.long)
        if pick.numel():
            dense = torch.zeros(pick.numel(), self.num_experts, dtype=torch.float64)
            dense.scatter_(1, ids[pick].cpu(), gates[pick].double().cpu())
            self.samples.append((logits[pick].double().cpu(), dense, residual[pick].double().pow(2).sum(-1).cpu()))
        sample_out = x.new_empty(pick.numel(), self.num_experts, x.shape[-1])
        batch = _Batch(x, ids, weights, pick, sample_out, torch.zeros(x.shape, dtype=torch.float32, device=x.device))
        self.batches.append(batch)
        return batch

    def run_group(self, batch: _Batch, experts: nn.Module, group: range) -> None:
        """Evaluate experts ``group`` (held by ``experts`` as local 0..n-1) on ``batch``."""
        flat = batch.ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # token-major within each expert, as torch.where
        ends = torch.bincount(flat, minlength=self.num_experts).cumsum(0).tolist()
        top_k = batch.ids.shape[1]
        sample_x = batch.x[batch.pick] if batch.pick.numel() else None
        for local, e in enumerate(group):
            start = ends[e - 1] if e else 0
            if ends[e] > start:
                slots = order[start : ends[e]]
                token_idx, slot = slots // top_k, slots % top_k
                out = expert_forward(experts, local, batch.x[token_idx])
                norms = out.float().norm(dim=-1).double()
                self.out_norm_sum[e] += float(norms.sum())
                self.gated_out_norm_sum[e] += float((norms * batch.weights[token_idx, slot].double()).sum())
                batch.routed.index_add_(0, token_idx, (out * batch.weights[token_idx, slot, None]).float())
            if sample_x is not None:
                batch.sample_out[:, e] = expert_forward(experts, local, sample_x)

    def output(self, batch: _Batch) -> torch.Tensor:
        """The experts module's output for ``batch`` (every group done); drops what only it needed."""
        out = batch.routed.to(batch.x.dtype)
        batch.x = batch.routed = batch.ids = batch.weights = None  # type: ignore[assignment]
        return out

    def _token_grams(self) -> torch.Tensor:
        """(S, E, E) float64 per-token Gram matrices, a float32 block of tokens at a time."""
        grams = []
        for batch in self.batches:
            per_token = max(1, GRAM_CHUNK_BYTES // max(1, self.num_experts * batch.sample_out.shape[-1] * 4))
            for chunk in batch.sample_out.split(per_token):
                outs = chunk.float()
                grams.append(torch.bmm(outs, outs.transpose(1, 2)).double().cpu())
            batch.sample_out = batch.sample_out[:0]
        return torch.cat(grams)

    def finish(self) -> LayerStats:
        logits, dense, resid_sq = (torch.cat(parts) for parts in zip(*self.samples))
        token_gram = self._token_grams()
        out_sq = torch.einsum("se,sef,sf->s", dense, token_gram, dense)  # ||sum_e w_e o_e||^2, exactly
        sums = ("freq", "soft_mass", "gate_mass", "out_norm_sum", "gated_out_norm_sum")
        stats = LayerStats(
            layer=self.layer, num_tokens=self.num_tokens, spec=self.spec, token_logits=logits, token_gram=token_gram,
            token_out_sq=out_sq, token_resid_sq=resid_sq, gram=token_gram.sum(0), **{name: getattr(self, name) for name in sums},
        )  # fmt: skip
        for name in ("freq", "soft_mass", "gram", "token_gram"):
            if not torch.isfinite(getattr(stats, name)).all():
                raise NonFiniteActivationError(
                    f"NaN/Inf in the expert statistics of decoder layer {self.layer} during calibration "
                    "(try --dtype float32, or check the layer's weights)"
                )
        return stats


@contextlib.contextmanager
def _experts_forward(experts: nn.Module, function) -> Iterator[None]:
    """``experts(x, ids, weights)`` calls ``function`` instead of the module's forward, for the ``with`` block."""
    experts.forward = function
    try:
        yield
    finally:
        del experts.forward


def _groups(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def layer_memory(lazy: LazyCausalLM, index: int, input_ids: torch.Tensor, *, batch_size: int, sample_tokens: int) -> LayerMemory:
    """The calibration memory terms of MoE layer ``index`` (:class:`~grape.calibration.memory_plan.LayerMemory`)."""
    layer = lazy.adapter.decoder_layers(lazy.model)[index]
    experts = lazy.adapter.moe_block(layer).experts
    count = int(experts.num_experts)
    routed = {id(p) for p in experts.parameters()}
    prefix = f"{lazy.layer_prefix(index)}.{lazy.experts_name(index)}"
    sources = lazy.index.sources_for(f"{prefix}.{next(iter(dict(experts.named_parameters())))}") or []
    config = lazy.config
    return LayerMemory.of_layer(
        num_experts=count,
        expert_params=sum(p.numel() for p in experts.parameters()) // count,
        other_params=sum(p.numel() for p in layer.parameters() if id(p) not in routed),
        largest_projection_params=max(p.numel() for p in experts.parameters()) // count,
        fused=len(sources) <= 2, dtype_bytes=lazy.dtype.itemsize, hidden_size=int(config.hidden_size),
        tokens=input_ids.numel(), sample_tokens=sample_tokens, batch_size=batch_size,
        seq_len=int(input_ids.shape[1]), num_heads=int(config.num_attention_heads),
    )  # fmt: skip


def measure_layer(
    lazy: LazyCausalLM, index: int, layer: nn.Module, forward, *, sample_tokens: int, seed: int,
    experts_per_group: int | None = None, statistics: bool = True,
) -> LayerStats | None:  # fmt: skip
    """Run the runner's layer ``forward`` with hooks that measure layer ``index``.

    Routed experts already materialised in ``layer`` are evaluated as they are (one pass).
    Experts on the meta device are read ``experts_per_group`` at a time (all at once when
    None): with one group, in the same single pass; with several, a first pass records every
    batch's block inputs and routing (its outputs are discarded, ``forward(keep=False)``),
    each group is read once and evaluated on every batch, and a second pass runs the layer
    again with the experts module returning the sums of the groups: the output passed on.
    With ``statistics=False`` (a layer already cached) only that output is produced.
    """
    block = lazy.adapter.moe_block(layer)
    experts = block.experts
    collector = _LayerStatsCollector(lazy.adapter, lazy.config, block, index, sample_tokens, seed)
    resident = experts.gate_up_proj.device.type != "meta"
    count = collector.num_experts
    groups = _groups(count, count if resident or experts_per_group is None else experts_per_group)
    handles = []
    norm = getattr(layer, "post_attention_layernorm", None)
    if norm is not None:
        handles.append(norm.register_forward_pre_hook(collector.residual_hook))
    try:
        if len(groups) == 1:
            with contextlib.nullcontext(experts) if resident else lazy.materialized_experts(index, groups[0]) as module:

                def single_pass(x, ids, weights):
                    batch = collector.route(x, ids, weights)
                    collector.run_group(batch, module, groups[0])
                    return collector.output(batch)

                with _experts_forward(experts, single_pass):
                    forward()
        else:
            with _experts_forward(experts, lambda x, ids, weights: torch.zeros_like(collector.route(x, ids, weights).x)):
                forward(keep=False)
            for group in tqdm(groups, desc=f"layer {index} experts", unit="group", leave=False):
                with lazy.materialized_experts(index, group) as module, torch.inference_mode():
                    for batch in collector.batches:
                        collector.run_group(batch, module, group)
            replay = iter(collector.batches)
            with _experts_forward(experts, lambda x, ids, weights: collector.output(next(replay))):
                forward()
    finally:
        for handle in handles:
            handle.remove()
    return collector.finish() if statistics else None


def collect_layer_stats(
    lazy: LazyCausalLM,
    input_ids: torch.Tensor,
    *,
    sample_tokens: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    max_memory: int | None = None,
) -> dict[int, LayerStats]:
    """Statistics of every MoE layer of ``lazy`` on ``input_ids`` (cached on disk).

    Calibration runs on the original model (each layer sees the unpruned model's activations).
    With ``use_cache=False`` every layer is recomputed (and the cache refreshed). Each MoE
    layer's routed experts are read in groups that fit ``max_memory`` bytes
    (:func:`grape.memory.memory_budget`; :func:`~grape.calibration.memory_plan.experts_per_group`);
    layers already cached are still run group by group to produce the next layer's inputs.

    Raises:
        InputError: a layer does not fit the budget even one expert at a time (before any layer runs).
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
    budget, held = memory_budget(max_memory), resident_bytes()
    group_size: dict[int, int] = {}
    for i in moe_layers:  # each layer's groups fit what the statistics of the layers before it leave
        if i > max(pending):
            break
        memory = layer_memory(lazy, i, input_ids, batch_size=batch_size, sample_tokens=sample_tokens)
        group_size[i] = experts_per_group(memory, budget, held)
        held += kept_statistics_bytes(memory.num_experts, min(sample_tokens, input_ids.numel()))

    def visit(index: int, layer: nn.Module, _hidden, forward) -> None:
        measured = index not in results
        stats = measure_layer(
            lazy, index, layer, forward, sample_tokens=sample_tokens if measured else 0, seed=seed,
            experts_per_group=group_size[index], statistics=measured,
        )  # fmt: skip
        if stats is not None:
            cache.save(stats)
            results[index] = stats

    run_layerwise(
        lazy,
        input_ids,
        visit,
        batch_size=batch_size,
        sequential=False,
        layers=sorted(group_size),
        stop_after=max(pending),
        desc="calibrating",
        experts_in_visitor=True,
    )
    return results
