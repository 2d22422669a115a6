"""How much memory and arithmetic a pruning run needs, from shapes alone: the model of the dry run.

A run holds one decoder layer at a time (:mod:`grape.calibration.runner`,
:mod:`grape.checkpoint`), so its peak resident memory is the interpreter and libraries plus the
largest of a few phases, each a sum of terms computed here from tensor shapes:

- **calibration of layer l** (:func:`calibration_bytes`). For prune's MoE layers it is the
  grouped calibration's own prediction (:func:`grape.calibration.memory_plan.calibration_bytes`
  over :func:`grouped_layer_memory`), with the group size calibration will choose from the same
  budget and the same measured process memory
  (:func:`grape.calibration.memory_plan.experts_per_group`): the dry run and calibration cannot
  disagree about groups. For other layers and for sparsify:
  the hidden states of every calibration token, kept between layers and accumulated as the
  layer's output (``activation_copies`` x tokens x hidden in the working dtype: two for prune,
  three for sparsify, which keeps its captured expert inputs and runs the layer twice); the
  layer's weights in the working dtype with only ``group`` routed experts materialised; the
  largest stored tensor read while materialising (it exists once stored and once dequantized);
  one batch's forward transients (attention scores, expert intermediates); and for prune the
  all-experts sample outputs and the per-token Gram matrices (S x E x E float64, what
  :class:`grape.stats.LayerStats` keeps).
- **statistics kept for later layers**: prune keeps every MoE layer's
  :class:`~grape.stats.LayerStats` until the plan is made (per layer S x E x E float64 and a
  few S x E and E x E tensors), so it is added to the calibration of the last layer and to the
  write; sparsify keeps only (E, in) float64 input sums per layer (negligible, counted too).
- **writing layer l**: the layer as materialised for its transform (drop mode: without its
  routed experts, which are streamed one at a time), plus the largest stored tensor in flight
  (and for sparsify the choice of one matrix's mask, which is made again from the kept statistics).
- **the embedding**: materialised once to embed the calibration tokens, and read again to be
  written.

Everything is in bytes; the interpreter and libraries (``baseline_bytes``) are measured by the
caller (:mod:`grape.dry_run`: the resident memory of the planning process itself, which has
imported what the run imports). Calibration FLOPs count multiply-adds twice: the layer forward
(top-k experts per token, attention scores over the causal half of the window) plus each
command's own evaluations (prune: every expert on its routed tokens again for the norms and on
the S sampled tokens; sparsify: the second forward and the experts' activations for down_proj).
"""

from __future__ import annotations

from dataclasses import dataclass

from grape.calibration import memory_plan

__all__ = [
    "LayerShape",
    "Workload",
    "calibration_bytes",
    "calibration_flops",
    "grouped_layer_memory",
    "kept_statistics_bytes",
    "write_bytes",
]

_FLOAT64 = 8


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer as the memory model sees it (bytes in the working dtype unless "stored").

    Attributes:
        index: decoder layer index.
        working_bytes: every parameter of the layer materialised in the working dtype.
        stored_bytes: the layer's tensors on disk (FP8 codes + scales, MXFP4 blocks, bf16...).
        experts: routed experts (None: a dense layer).
        expert_working_bytes, expert_stored_bytes: one routed expert's share of the above.
        largest_stored_bytes: the largest single tensor of the layer on disk.
        dense_params: parameters every token goes through (attention, shared experts, a dense
            MLP, the router); expert_params: one routed expert's parameters;
            expert_largest_params: one routed expert's share of its largest tensor (gate_up_proj).
        top_k: routed experts per token; intermediate: one routed expert's intermediate width.
        fused_experts: the routed experts are stored in tensors over all experts (transformers'
            fused layout, MXFP4), so materialising some of them reads rows of a larger tensor.
    """

    index: int
    working_bytes: int
    stored_bytes: int
    experts: int | None
    expert_working_bytes: int
    expert_stored_bytes: int
    largest_stored_bytes: int
    dense_params: int
    expert_params: int
    expert_largest_params: int
    top_k: int
    intermediate: int
    fused_experts: bool = False

    @property
    def is_moe(self) -> bool:
        return self.experts is not None


@dataclass(frozen=True)
class Workload:
    """What one command does with the model, as far as memory and FLOPs go.

    Attributes:
        command: ``"prune"`` or ``"sparsify"``.
        samples, seq_len, batch_size: the calibration windows (samples 0: no calibration).
        hidden, heads, head_dim: the model's widths; itemsize: bytes per working-dtype value.
        sample_tokens: prune's all-experts token sample per layer (0 for sparsify).
        activation_copies: token x hidden tensors alive while a layer is calibrated.
        kept_fraction: routed experts kept by the output (1.0: all).
        write_materialises_experts: the write needs the routed experts' weights in memory
            (merge, sparsify); drop mode streams kept experts from the source instead.
        last_calibrated_layer: calibration stops after this layer (None: the last MoE layer).
    """

    command: str
    samples: int
    seq_len: int
    batch_size: int
    hidden: int
    heads: int
    head_dim: int
    itemsize: int
    sample_tokens: int = 0
    activation_copies: int = 2
    kept_fraction: float = 1.0
    write_materialises_experts: bool = True
    last_calibrated_layer: int | None = None

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len

    @property
    def batch_tokens(self) -> int:
        return min(self.batch_size, self.samples) * self.seq_len

    @property
    def sampled(self) -> int:
        """Tokens on which every expert is evaluated (prune), at most the calibration's."""
        return min(self.sample_tokens, self.tokens)


def _forward_transient_bytes(layer: LayerShape, work: Workload) -> int:
    """One batch through the layer: attention scores and projections, expert intermediates."""
    per_token = work.heads * work.seq_len + 8 * work.hidden + 4 * work.heads * work.head_dim
    if layer.is_moe:
        per_token += layer.top_k * 3 * layer.intermediate + 2 * layer.experts
    return work.batch_tokens * per_token * work.itemsize


def grouped_layer_memory(layer: LayerShape, work: Workload) -> memory_plan.LayerMemory:
    """Prune's calibration terms of MoE ``layer``, as :mod:`grape.calibration.collect` builds them
    from the loaded layer."""
    return memory_plan.LayerMemory.of_layer(
        num_experts=layer.experts, expert_params=layer.expert_params, other_params=layer.dense_params,
        largest_projection_params=layer.expert_largest_params, fused=layer.fused_experts,
        dtype_bytes=work.itemsize, hidden_size=work.hidden, tokens=work.tokens, sample_tokens=work.sample_tokens,
        batch_size=work.batch_size, seq_len=work.seq_len, num_heads=work.heads,
    )  # fmt: skip


def calibration_bytes(layer: LayerShape, work: Workload, *, group: int | None = None) -> int:
    """Bytes held while ``layer`` is calibrated with ``group`` routed experts materialised at once
    (default: every expert of the layer); see the module docs for each term. The interpreter and
    statistics kept from earlier layers are not included.
    """
    if layer.is_moe:
        group = layer.experts if group is None else max(1, min(group, layer.experts))
        if work.command == "prune":
            return memory_plan.calibration_bytes(grouped_layer_memory(layer, work), group)
    activations = work.activation_copies * work.tokens * work.hidden * work.itemsize
    transients = _forward_transient_bytes(layer, work)
    if not layer.is_moe:
        return activations + layer.working_bytes + layer.largest_stored_bytes + transients
    experts = layer.experts
    weights = layer.working_bytes - (experts - group) * layer.expert_working_bytes
    reading = min(layer.largest_stored_bytes, max(layer.expert_stored_bytes * group, layer.largest_stored_bytes // experts))
    # sparsify: one batch's (T, H) float64 squares and (T, E) gates, then one matrix's mask
    statistics = max(work.batch_tokens * (2 * work.hidden + 2 * experts) * _FLOAT64, _mask_bytes(layer))
    return activations + weights + reading + transients + statistics


def _mask_bytes(layer: LayerShape) -> int:
    """Choosing one expert matrix's pruned weights (:mod:`grape.sparsity`): float64 scores, the
    sort's values and int64 indices, the boolean masks (measured: 27 bytes per weight), for the
    larger matrix (gate_up_proj)."""
    return 4 * _FLOAT64 * layer.expert_largest_params


def kept_statistics_bytes(layer: LayerShape, work: Workload) -> int:
    """What the command keeps of one calibrated MoE layer until the end of the run."""
    if not layer.is_moe or work.samples == 0:
        return 0
    experts = layer.experts
    if work.command == "prune":
        return memory_plan.kept_statistics_bytes(experts, work.sampled)
    return 2 * 2 * experts * (work.hidden + layer.intermediate) * _FLOAT64


def write_bytes(layer: LayerShape, work: Workload) -> int:
    """Bytes held while ``layer`` is transformed and written (the interpreter not included)."""
    if not layer.is_moe or work.write_materialises_experts:
        masks = _mask_bytes(layer) if layer.is_moe and work.command == "sparsify" else 0
        return layer.working_bytes + layer.largest_stored_bytes + masks
    routed = layer.experts * layer.expert_working_bytes
    return layer.working_bytes - routed + 2 * layer.expert_stored_bytes


def calibration_flops(layer: LayerShape, work: Workload) -> int:
    """Floating-point operations calibration spends on ``layer`` (0 when it is not calibrated)."""
    if work.samples == 0:
        return 0
    tokens = work.tokens
    attention = 2 * work.heads * work.head_dim * work.seq_len  # q.k and p.v over the causal half
    dense = 2 * layer.dense_params + attention
    if not layer.is_moe:
        return tokens * dense
    routed = 2 * layer.top_k * layer.expert_params
    if work.command == "prune":
        everyone = work.sampled * (2 * layer.experts * layer.expert_params + 2 * layer.experts**2 * work.hidden)
        return tokens * (dense + 2 * routed) + everyone
    gate_up = routed * 2 // 3
    return tokens * (2 * dense + routed + gate_up)
