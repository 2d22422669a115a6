"""How many routed experts of one MoE layer calibration materialises at once, within a memory budget.

A DeepSeek-V3 MoE layer holds 256 experts of 44M parameters: 22.5 GB in bf16, more than a
24 GB machine can spare. Calibration therefore reads a layer's routed experts in contiguous
groups (:meth:`grape.model_io.LazyCausalLM.materialized_experts`) and this module chooses the
group size: the largest that keeps the layer's predicted calibration memory within the budget.
The prediction is :func:`calibration_bytes`, one sum of the terms of :class:`LayerMemory`, on
top of the process's own resident memory (the interpreter and libraries, measured by the
caller: :func:`grape.memory.resident_bytes`); the dry run predicts a run's peak from the same
functions and the same measurement, so the two cannot disagree.

What the prediction assumes (bytes of the running process, for one MoE layer at a time):

- ``HEADROOM_BYTES`` for allocator slack and one tensor being read and dequantized;
- the layer's weights other than the routed experts (attention, router, shared experts, norms)
  in the working dtype;
- the activations: the hidden states entering and leaving the layer (working dtype), the
  MoE block inputs recorded for the groups (working dtype) and the routed output accumulated in
  float32, all for every calibration token; plus one batch's attention scores (float32, batch
  x heads x length^2, twice: scores and probabilities);
- the sampled tokens' outputs of every expert (S x E x H in the working dtype: the expert math
  runs in that dtype, so storing them so loses nothing) and their per-token Gram matrices
  (S x E x E float64, the statistic itself);
- per materialised expert: its weights in the working dtype, plus, when its tensors are fused
  over experts (or MXFP4), the read transient of its largest projection (stored rows and a decoded
  copy: twice its working-dtype bytes). Per-expert tensors are read one at a time into place,
  so their transient is one tensor, inside ``HEADROOM_BYTES``.

The Gram matrices are built from the stored outputs a few tokens at a time in float32
(``GRAM_CHUNK_BYTES`` of transient), never as an S x E x H float64 tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from grape.errors import InputError

__all__ = ["HEADROOM_BYTES", "GRAM_CHUNK_BYTES", "LayerMemory", "calibration_bytes", "experts_per_group", "kept_statistics_bytes"]

HEADROOM_BYTES = 64 * 2**20
"""Bytes besides the terms of :class:`LayerMemory` and the process's own: allocator slack and a
one-tensor transient (a per-expert tensor being read and dequantized). On the full-width
DeepSeek-V3 layer (benchmarks/deepseek_v3_prune.py) the measured peak was within 5% of the
prediction with it."""

GRAM_CHUNK_BYTES = 64 * 2**20
"""Largest float32 block of sampled expert outputs turned into Gram matrices at once."""


@dataclass(frozen=True)
class LayerMemory:
    """The bytes one MoE layer's calibration holds, by what holds them (see the module docs).

    Attributes:
        num_experts: routed experts in the layer (E).
        expert_bytes: one routed expert's weights in the working dtype.
        expert_read_bytes: read transient per materialised expert (0 for per-expert tensors).
        other_bytes: the layer's other weights in the working dtype.
        activation_bytes: hidden states, recorded block inputs, routed sums, attention scores.
        sample_bytes: every expert's outputs on the sampled tokens and their Gram matrices.
    """

    num_experts: int
    expert_bytes: int
    expert_read_bytes: int
    other_bytes: int
    activation_bytes: int
    sample_bytes: int

    @classmethod
    def of_layer(
        cls, *, num_experts: int, expert_params: int, other_params: int, largest_projection_params: int,
        fused: bool, dtype_bytes: int, hidden_size: int, tokens: int, sample_tokens: int,
        batch_size: int, seq_len: int, num_heads: int,
    ) -> LayerMemory:  # fmt: skip
        """The terms from plain sizes (parameters per expert, tokens...), as the dry run knows them."""
        samples = min(sample_tokens, tokens)
        return cls(
            num_experts=num_experts,
            expert_bytes=expert_params * dtype_bytes,
            expert_read_bytes=2 * largest_projection_params * dtype_bytes if fused else 0,
            other_bytes=other_params * dtype_bytes,
            activation_bytes=tokens * hidden_size * (3 * dtype_bytes + 4) + 2 * batch_size * num_heads * seq_len**2 * 4,
            sample_bytes=samples * num_experts * (hidden_size * dtype_bytes + num_experts * 8),
        )


def calibration_bytes(memory: LayerMemory, group: int) -> int:
    """Predicted bytes, on top of the process's own, while the layer is calibrated with ``group``
    experts materialised at once."""
    fixed = HEADROOM_BYTES + memory.other_bytes + memory.activation_bytes + memory.sample_bytes
    return fixed + group * (memory.expert_bytes + memory.expert_read_bytes)


def kept_statistics_bytes(num_experts: int, sampled_tokens: int) -> int:
    """What prune keeps of one calibrated MoE layer until the plan: its
    :class:`grape.stats.LayerStats`, float64 (per sampled token: router logits, the E x E output
    Gram, two norms; per layer: the E x E Gram and five per-expert sums). Later layers'
    groups are sized by what is left after these."""
    e = num_experts
    return 8 * (sampled_tokens * (e * e + e + 2) + e * e + 5 * e)


def experts_per_group(memory: LayerMemory, budget: int, baseline: int) -> int:
    """The most experts (1..E) whose calibration fits ``budget`` bytes on top of the ``baseline``
    bytes the process already holds (:func:`calibration_bytes`): its own memory and the
    statistics kept from earlier layers.

    Raises:
        InputError: not even one expert at a time fits; the message says how much would.
    """
    per_expert = memory.expert_bytes + memory.expert_read_bytes
    room = budget - baseline - calibration_bytes(memory, 0)
    if room < per_expert:
        need = baseline + calibration_bytes(memory, 1)
        raise InputError(
            f"calibrating one MoE layer needs at least {need / 1e9:.2f} GB even one expert at a time, "
            f"more than the memory budget of {budget / 1e9:.2f} GB; raise --max-memory, or lower "
            "--sample-tokens, --calib-samples or --seq-len"
        )
    return max(1, min(memory.num_experts, room // per_expert))
