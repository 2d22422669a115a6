"""The fast CPU path: sort (token, slot) pairs by expert once, then one GEMM per active expert.

The method runs in two implementations. On packed weights (``ops.cpu_prepack``: float32 and
bfloat16 with oneDNN, within the packing budget) it runs in C++ (``ops/cpu_native.cpp``, built
at first use by ``ops.cpu_native``): the same steps as loops over raw memory plus two oneDNN
calls per expert, 1.02-1.55x this module's Python loop (``benchmarks/RESULTS.md``, the
``grape-cpu-python`` rows). The Python loop below runs everything else (plain weights, float16,
machines where the extension cannot be built) and is tested on every machine.

Why it is built this way (each choice measured on the project's AVX-512 CPU with one thread
and CPU time; end-to-end numbers against transformers are in benchmarks/RESULTS.md):

- Dispatch is vectorised: ``bincount`` + ``argsort`` of the T*k expert ids replace the
  per-expert ``one_hot``/``where`` scans of transformers' eager path, and the Python-level
  work is one loop over the experts that actually received tokens. Experts with no tokens cost
  nothing, which is what makes a pruned layer with a few hot experts cheap.
- Each expert's tokens are a contiguous slice of one gathered (S, H) matrix, and gate and up
  come out of one fused (S, 2I) GEMM. On plain weights each GEMM writes into a slice of one
  output buffer (oneDNN's packed product has no ``out=``: its per-expert results are joined
  by one ``cat`` per projection, 1% of the time at 1024 tokens). Where every expert would use
  plain ``torch.mm``, and on small layers always, one ``grouped_mm`` call runs that loop in
  C++ (5-10% faster than a Python loop on small layers).
- Each expert's GEMMs run oneDNN's product on weights packed once for it (``ops.cpu_prepack``:
  made on first use, kept while the weights are unchanged, within a memory budget), the
  fastest formulation measured at every row count, 1.2-3x the unpacked ones on a
  Mixtral-shaped layer; only bfloat16 decode steps on small experts keep ATen's GEMV on the
  plain weights (lower per-call cost there). Without packed copies (budget spent, float16, no
  oneDNN) the formulations below apply.
- The GEMM formulation on plain weights is chosen per expert by its row count
  (``_linear_into``). For float32, MKL's sgemm (what ``torch.mm`` uses) is slow for a few
  rows against a large weight; oneDNN's matmul is 1.3-1.9x faster from 4 rows up on weights
  of >= 2M elements, and for 2-3 rows the weight-major product ``W @ x.T`` (the GEMV-like
  case MKL handles well) is 1.5-3x faster than ``x @ W.T``. bfloat16 GEMMs go through oneDNN, whose single-row GEMV is 2x slower than
  ATen's own, so one-row bfloat16 products (decoding) use ATen's.
- The weighted top-k sum is one ``index_add_`` into a float32 accumulator (4x faster than
  un-permuting and summing over k, and it rounds bfloat16 only once, at the end).
- A single token (decoding) skips the sort entirely: its k experts are distinct, so a loop
  over the k pairs reads each expert's weights once. (A gather-based ``bmm`` over
  ``w[topk_ids]``, as transformers' ``batched_mm`` does, was 2-3x slower even at T = 1: it
  copies every selected expert's weights before multiplying.)

This path is for inference: ``out=`` GEMMs record no autograd history, so it refuses inputs
that require gradients (the transformers integration then uses transformers' own
``grouped_mm``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch.nn import functional as F

from grape_kernels.expert_weights import ExpertWeights
from grape_kernels.library import experts_op
from grape_kernels.ops.common import check_experts_inputs, ids_out_of_range, split_gate_up
from grape_kernels.ops.cpu_native import native_ops
from grape_kernels.ops.cpu_prepack import packed_linear, prepacked

__all__ = ["cpu_experts"]

#: Smallest weight (elements) for which float32 GEMMs of >= 4 rows go through oneDNN; below
#: it oneDNN's per-call overhead outweighs its faster kernel (measured break-even ~1-2M).
_ONEDNN_MIN_WEIGHT = 1 << 21
#: Row counts for which float32 uses the weight-major product ``W @ x.T``.
_WEIGHT_MAJOR_ROWS = (2, 3)
#: One-row products on expert weights smaller than this run a GEMV on the plain weights (ATen's
#: for bfloat16; for float32 MKL's in the Python loop, grape's AVX-512 one in the C++ loop): its
#: lower per-call cost beats oneDNN's packed product there (float32 256x512: 8 vs 16 us; the C++
#: loop's GEMV took the pruned model's float32 decode from 1.3x to 1.9x over transformers); on
#: larger experts the packed product reads faster (Mixtral-shaped: 1.5x vs 1.3x over transformers).
_PACKED_GEMV_MIN_WEIGHT = 1 << 21
#: Below this many weight elements the per-expert formulations save less per GEMM (20-40 us)
#: than leaving ``grouped_mm``'s C++ loop for a Python one costs, so small layers never do.
_LOOP_MIN_WEIGHT = 1 << 19


@functools.cache
def _onednn_linear():
    """oneDNN's dense linear (``mkldnn::_linear_pointwise``), or None where this torch lacks it.

    The op is what inductor emits for CPU linears; it is not public API, hence the probe. It runs
    at first use, not at import: a oneDNN call at import would fix oneDNN's cache sizes
    (read from the environment at its first primitive) before ``grape.memory`` can choose them.
    """
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        probe = op(torch.ones(1, 4), torch.ones(2, 4), None, "none", [None], "")
    except (AttributeError, RuntimeError):
        return None
    return op if torch.equal(probe, torch.full((1, 2), 4.0)) else None


def _probe_grouped_mm():
    """``torch.nn.functional.grouped_mm`` where it runs on CPU tensors (torch >= 2.9), else None."""
    grouped_mm = getattr(F, "grouped_mm", None)
    if grouped_mm is None:
        return None
    try:
        probe = grouped_mm(torch.ones(3, 2), torch.ones(2, 2, 1), offs=torch.tensor([1, 3], dtype=torch.int32))
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return grouped_mm if torch.equal(probe, torch.full((3, 1), 2.0)) else None


_GROUPED_MM = _probe_grouped_mm()


def _formulation(x: torch.Tensor, weight: torch.Tensor, rows: int, transposed: bool) -> str:
    """Which GEMM formulation ``_linear_into`` uses for ``rows`` rows against one expert weight.

    - ``onednn``: float32, >= 4 rows, weight >= ``_ONEDNN_MIN_WEIGHT`` elements: oneDNN's
      matmul, 1.3-1.9x faster than MKL's sgemm there.
    - ``weight_major``: float32, 2-3 rows, (out, in) storage: ``(W @ x.T).T``, 1.5-3x faster
      than ``x @ W.T`` (MKL handles the GEMV-like shape well, the few-row one badly).
    - ``aten_gemv``: bfloat16, one row, (out, in) storage: ATen's own bf16 GEMV (fp32
      accumulation) instead of oneDNN's, 1.5-2.4x faster on every expert size measured; with
      (in, out) storage ATen's GEMV is 4-10x slower, so transposed weights keep oneDNN.
    - ``mm``: everything else (``torch.mm``, oneDNN for bf16, MKL for fp32).
    """
    if x.dtype == torch.float32:
        if rows >= 4 and weight[0].numel() >= _ONEDNN_MIN_WEIGHT and _onednn_linear() is not None:
            return "onednn"
        if rows in _WEIGHT_MAJOR_ROWS and not transposed:
            return "weight_major"
    elif x.dtype == torch.bfloat16 and rows == 1 and not transposed and torch.backends.mkldnn.enabled:
        return "aten_gemv"
    return "mm"


class _Groups(NamedTuple):
    """The experts that received rows, in order, and how many rows each got (sorted layout)."""

    active: list[int]
    sizes: list[int]
    offsets: torch.Tensor  # int32 cumulative row counts over all experts, as grouped_mm takes
    transposed: bool


def _project(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: _Groups,
    out_features: int,
    packed: list[torch.Tensor] | None,
) -> torch.Tensor:
    """One projection of all experts over the expert-sorted rows ``x``: (S, in) -> (S, out).

    With ``packed`` weights (``cpu_prepack``) every expert runs oneDNN's packed linear, the
    fastest formulation at every row count measured; otherwise one is chosen per expert.
    """
    if packed is not None:
        outs = [
            packed_linear(x_e, packed[expert], None if bias is None else bias[expert])
            for expert, x_e in zip(groups.active, x.split(groups.sizes))
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    transposed = groups.transposed
    kinds = [_formulation(x, weight, rows, transposed) for rows in groups.sizes]
    if _GROUPED_MM is not None and (weight[0].numel() < _LOOP_MIN_WEIGHT or all(kind == "mm" for kind in kinds)):
        out = _GROUPED_MM(x, weight if transposed else weight.transpose(1, 2), offs=groups.offsets)
        if bias is not None:
            out += bias[groups.active].repeat_interleave(torch.tensor(groups.sizes, device=x.device), dim=0)
        return out
    out = x.new_empty(x.shape[0], out_features)
    for expert, kind, x_e, out_e in zip(groups.active, kinds, x.split(groups.sizes), out.split(groups.sizes)):
        _linear_into(out_e, x_e, weight[expert], None if bias is None else bias[expert], transposed, kind)
    return out


def _linear_into(
    out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool, kind: str
) -> None:
    """``out = x @ W.T + bias`` (``x @ W + bias`` for transposed storage) as formulation ``kind``."""
    w_out_in = weight.t() if transposed else weight
    if kind == "onednn":
        out.copy_(_onednn_linear()(x, w_out_in, bias, "none", [None], ""))
        return
    if kind == "weight_major":
        if bias is None:
            result_t = torch.mm(weight, x.t())
        else:
            result_t = torch.addmm(bias.unsqueeze(1), weight, x.t())
        out.copy_(result_t.t())
        return
    if kind == "aten_gemv":
        # The only switch to ATen's GEMV is the process-wide oneDNN flag: it is off for the
        # duration of this one call (a bf16 GEMM another Python thread starts meanwhile would
        # take the slower ATen path too, correctly) and restored even on error.
        torch.backends.mkldnn.enabled = False
        try:
            _mm_into(out, x, w_out_in.t(), bias)
        finally:
            torch.backends.mkldnn.enabled = True
        return
    _mm_into(out, x, w_out_in.t(), bias)


def _mm_into(out: torch.Tensor, x: torch.Tensor, w_in_out: torch.Tensor, bias: torch.Tensor | None) -> None:
    if bias is None:
        torch.mm(x, w_in_out, out=out)
    else:
        torch.addmm(bias, x, w_in_out, out=out)


def _activate(gate_up: torch.Tensor, weights: ExpertWeights) -> torch.Tensor:
    """Gated activation of a (S, 2I) buffer (overwritten) into a new contiguous (S, I) tensor.

    The result is written contiguously rather than left as a view into the buffer: as a view
    its rows are 2I elements apart, and with 2I * 4 bytes a multiple of 4 KiB (I = 512 in
    float32) the down-projection GEMM then ran 20% slower from cache-set aliasing.
    """
    gate, up = split_gate_up(gate_up, weights.interleaved)
    if weights.activation == "silu":
        F.silu(gate, inplace=True)
        return torch.mul(gate, up)
    limit = weights.swiglu_limit
    gate.clamp_(max=limit)
    up.clamp_(min=-limit, max=limit).add_(1.0)
    return torch.mul(gate, weights.swiglu_alpha).sigmoid_().mul_(gate).mul_(up)


@experts_op("cpu")
def cpu_experts(
    hidden: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Routed-experts output (T, H) in the input dtype; see the module docstring for the method."""
    problem = check_experts_inputs(hidden, weights, topk_ids, topk_weights, check_ids=False)
    tensors = (hidden, topk_weights, weights.w_gate_up, weights.w_down, weights.gate_up_bias, weights.down_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            "the cpu experts backend is inference-only; call it under torch.no_grad() or "
            "torch.inference_mode(), or use a differentiable implementation for training"
        )
    tokens, top_k, experts = problem.tokens, problem.top_k, problem.experts
    if tokens == 0:
        return hidden.new_zeros(0, problem.hidden)
    native = _native_call(hidden, weights, topk_ids, topk_weights, problem)
    if native is not None:
        return native
    flat_ids = topk_ids.reshape(-1)
    if tokens == 1:
        ids = flat_ids.tolist()
        if min(ids) < 0 or max(ids) >= experts:
            raise ids_out_of_range(experts, min(ids), max(ids))
        small_bf16 = hidden.dtype == torch.bfloat16 and weights.w_gate_up[0].numel() < _PACKED_GEMV_MIN_WEIGHT
        packed_gate_up, packed_down = (None, None) if small_bf16 else _packed(weights, hidden.dtype)
        if packed_gate_up is not None:
            return _single_token_packed(hidden, weights, ids, topk_weights, packed_gate_up, packed_down)
        return _single_token(hidden, weights, ids, topk_weights, problem.intermediate)
    packed_gate_up, packed_down = _packed(weights, hidden.dtype)

    # bincount doubles as the id range check: it rejects negatives and grows past E for ids >= E.
    try:
        counts = torch.bincount(flat_ids, minlength=experts)
    except RuntimeError:
        raise ids_out_of_range(experts, int(flat_ids.min()), int(flat_ids.max())) from None
    if counts.numel() > experts:
        raise ids_out_of_range(experts, int(flat_ids.min()), int(flat_ids.max()))
    offsets = counts.cumsum(0, dtype=torch.int32)
    order = torch.argsort(flat_ids, stable=True)
    pair_token = order.div(top_k, rounding_mode="floor")
    pair_weight = topk_weights.reshape(-1).index_select(0, order)
    count_list = counts.tolist()
    active = [expert for expert, count in enumerate(count_list) if count]
    groups = _Groups(active, [count_list[expert] for expert in active], offsets, weights.transposed)
    # Each (S, .) intermediate is dropped as soon as it is consumed, so the peak is the (S, 2I)
    # projection plus its activation rather than the sum of all of them.
    gathered = hidden.index_select(0, pair_token)
    gate_up = _project(
        gathered, weights.w_gate_up, weights.gate_up_bias, groups, 2 * problem.intermediate, packed_gate_up
    )
    del gathered
    h = _activate(gate_up, weights)
    del gate_up
    weighted = torch.mul(
        _project(h, weights.w_down, weights.down_bias, groups, problem.hidden, packed_down),
        pair_weight.float().unsqueeze(1),
    )
    del h
    out = torch.zeros(tokens, problem.hidden, dtype=torch.float32, device=hidden.device)
    out.index_add_(0, pair_token, weighted)
    return out.to(hidden.dtype)


def _native_call(
    hidden: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor, topk_weights: torch.Tensor, problem
) -> torch.Tensor | None:
    """The call through the C++ loop (``cpu_native``), or None to run the Python loop.

    The C++ loop runs oneDNN on the packed copies; without them (budget spent, float16, no
    oneDNN) the per-row-count formulations of :func:`_formulation` run in Python, and so does
    everything where the extension could not be built. One row against a small
    (cache-resident) expert runs a GEMV on the plain weight instead, as the Python loop does;
    a decode step whose products are all such GEMVs needs no packed copies (nor their checks).
    """
    ops = native_ops()
    if ops is None:
        return None
    gemv = not weights.transposed and torch.backends.mkldnn.enabled
    gemv_gate_up = gemv and weights.w_gate_up[0].numel() < _PACKED_GEMV_MIN_WEIGHT
    gemv_down = gemv and weights.w_down[0].numel() < _PACKED_GEMV_MIN_WEIGHT
    if problem.tokens == 1 and gemv_gate_up and gemv_down and hidden.dtype in (torch.float32, torch.bfloat16):
        packed_gate_up, packed_down = [], []
    else:
        packed_gate_up, packed_down = _packed(weights, hidden.dtype)
        if packed_gate_up is None:
            return None
    return ops.cpu_experts(
        hidden, topk_ids, topk_weights, problem.experts, packed_gate_up, packed_down, weights.w_gate_up,
        weights.w_down, gemv_gate_up, gemv_down, weights.gate_up_bias, weights.down_bias, problem.intermediate,
        weights.interleaved, weights.activation == "gpt_oss", weights.swiglu_alpha, weights.swiglu_limit,
    )  # fmt: skip


def _single_token(
    hidden: torch.Tensor, weights: ExpertWeights, ids: list[int], topk_weights: torch.Tensor, intermediate: int
) -> torch.Tensor:
    """Decode step: one (1, H) token through its k experts, summed in float32.

    In float32 ``addmm_`` folds the routing weight and the sum into the down GEMM; other
    dtypes add each expert's output into a float32 accumulator, as the batched path does.
    """
    w_gate_up, w_down, transposed = weights.w_gate_up, weights.w_down, weights.transposed
    gate_up_bias, down_bias = weights.gate_up_bias, weights.down_bias
    fused = hidden.dtype == torch.float32
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    gate_up = hidden.new_empty(1, 2 * intermediate)
    y = hidden.new_empty(hidden.shape)
    gate_up_kind = _formulation(hidden, w_gate_up, 1, transposed)
    down_kind = _formulation(hidden, w_down, 1, transposed)
    for expert, weight in zip(ids, topk_weights.reshape(-1).tolist()):
        bias = None if gate_up_bias is None else gate_up_bias[expert]
        _linear_into(gate_up, hidden, w_gate_up[expert], bias, transposed, gate_up_kind)
        h = _activate(gate_up, weights)
        bias = None if down_bias is None else down_bias[expert]
        if fused and bias is None:
            out.addmm_(h, w_down[expert] if transposed else w_down[expert].t(), alpha=weight)
        else:
            _linear_into(y, h, w_down[expert], bias, transposed, down_kind)
            out.add_(y, alpha=weight)
    return out.to(hidden.dtype)


def _packed(weights: ExpertWeights, dtype: torch.dtype) -> tuple[list | None, list | None]:
    """Both projections' packed weights (``cpu_prepack``), or (None, None) to run the plain ones."""
    if weights.w_gate_up.dtype != dtype:
        return None, None
    gate_up = prepacked(weights.w_gate_up, weights.transposed)
    down = None if gate_up is None else prepacked(weights.w_down, weights.transposed)
    return (gate_up, down) if down is not None else (None, None)


def _single_token_packed(
    hidden: torch.Tensor,
    weights: ExpertWeights,
    ids: list[int],
    topk_weights: torch.Tensor,
    gate_up: list[torch.Tensor],
    down: list[torch.Tensor],
) -> torch.Tensor:
    """Decode step on packed weights: each of the k experts once, summed in float32."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    gate_up_bias, down_bias = weights.gate_up_bias, weights.down_bias
    for expert, weight in zip(ids, topk_weights.reshape(-1).tolist()):
        bias = None if gate_up_bias is None else gate_up_bias[expert]
        h = _activate(packed_linear(hidden, gate_up[expert], bias), weights)
        bias = None if down_bias is None else down_bias[expert]
        out.add_(packed_linear(h, down[expert], bias), alpha=weight)
    return out.to(hidden.dtype)
