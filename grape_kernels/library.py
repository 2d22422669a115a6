"""Every kernel entry point as a ``torch.library`` custom op, so ``torch.compile`` can hold it.

``torch.compile`` traces Python; it cannot trace through a Triton launcher, a compiled
extension or a loop that reads expert counts back to the host, and a model that reaches one
graph-breaks (``fullgraph=True`` fails). Each entry point is therefore registered as a custom op
(``grape::<backend>_experts``, ``grape::<backend>_route_topk``, ``grape::<backend>_align_block_size``)
with a fake implementation that only computes output shapes (and runs the shape checks), and
the decorated function calls the op whenever torch.compile is tracing. Outside tracing it calls
the implementation directly: going through the dispatcher costs 5-10 us per call (measured on
this project's CPU), a visible share of a decode step on a small layer, and buys nothing in
eager mode.

The ops take the flat fields of :class:`~grape_kernels.expert_weights.ExpertWeights` and
:class:`~grape_kernels.routing.RoutingSpec` (a schema cannot hold a record) and rebuild the
record for the implementation, so implementations keep their one-value signatures. No op has
an autograd formula: the transformers integration runs transformers' own path whenever autograd
records (see ``grape_kernels.integration``), so the ops only ever see inference calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from grape_kernels.expert_weights import ExpertWeights
from grape_kernels.kernel_checks import check_align_args, check_experts_args, check_route_args
from grape_kernels.routing import RoutingSpec

__all__ = ["EXPERTS_SCHEMA", "ROUTE_SCHEMA", "ALIGN_SCHEMA", "experts_op", "routing_op", "align_op", "spec_fields"]

EXPERTS_SCHEMA = (
    "(Tensor hidden, Tensor w_gate_up, Tensor w_down, Tensor? gate_up_bias, Tensor? down_bias, str activation, "
    "float swiglu_alpha, float swiglu_limit, bool transposed, bool interleaved, Tensor topk_ids, "
    "Tensor topk_weights) -> Tensor"
)
"""``hidden``, the fields of ``ExpertWeights`` in order, then the routing of each token."""

ROUTE_SCHEMA = (
    "(Tensor logits, int top_k, str score_fn, bool topk_before_softmax, bool renormalize, float scaling, "
    "int n_group, int topk_group, str group_score, Tensor? correction_bias) -> (Tensor, Tensor)"
)
"""``logits``, then the fields of ``RoutingSpec`` in order."""

ALIGN_SCHEMA = "(Tensor topk_ids, int num_experts, int block_m) -> (Tensor, Tensor, Tensor)"


def spec_fields(spec: RoutingSpec) -> tuple:
    """The fields of ``spec`` in declaration order (what ``RoutingSpec(*fields)`` rebuilds)."""
    return (
        spec.top_k,
        spec.score_fn,
        spec.topk_before_softmax,
        spec.renormalize,
        spec.scaling,
        spec.n_group,
        spec.topk_group,
        spec.group_score,
        spec.correction_bias,
    )


def _kernel_op(name: str, schema: str, fn: Callable, fake: Callable, to_fields: Callable, from_fields: Callable):
    """Register ``fn`` as op ``grape::<name>`` and return its entry point (same signature as ``fn``).

    ``to_fields`` flattens ``fn``'s arguments into the schema's, ``from_fields`` rebuilds them;
    ``fake`` takes ``fn``'s arguments and returns empty outputs of the right shapes. Extra
    keyword arguments (the Triton launcher's explicit ``config``, used by the tuner) are an
    eager-only path that bypasses the op.
    """
    op = torch.library.custom_op(
        f"grape::{name}", lambda *fields: fn(*from_fields(*fields)), mutates_args=(), schema=schema
    )
    op.register_fake(lambda *fields: fake(*from_fields(*fields)))

    @functools.wraps(fn)
    def entry(*args, **options):
        if options or not torch.compiler.is_compiling():
            return fn(*args, **options)
        return op(*to_fields(*args))

    entry.op = op
    return entry


def _experts_fake(hidden: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
    check_experts_args(hidden, weights, topk_ids, topk_weights)
    return hidden.new_empty(hidden.shape)


def _route_fake(logits: torch.Tensor, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    check_route_args(logits, spec)
    shape = (logits.shape[0], spec.top_k)
    return logits.new_empty(shape, dtype=torch.int32), logits.new_empty(shape, dtype=torch.float32)


def _align_fake(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    check_align_args(topk_ids, num_experts, block_m)
    rows = topk_ids.numel() + num_experts * (block_m - 1)
    tiles = (rows + block_m - 1) // block_m
    return tuple(topk_ids.new_empty(shape, dtype=torch.int32) for shape in ((rows,), (tiles,), ()))


def experts_op(backend: str) -> Callable[[Callable], Callable]:
    """Decorate ``fn(hidden, weights, topk_ids, topk_weights)`` as op ``grape::<backend>_experts``."""
    return lambda fn: _kernel_op(
        f"{backend}_experts", EXPERTS_SCHEMA, fn, _experts_fake,
        lambda hidden, weights, ids, w: (hidden, *weights, ids, w),
        lambda hidden, *fields: (hidden, ExpertWeights(*fields[:-2]), *fields[-2:]),
    )


def routing_op(backend: str) -> Callable[[Callable], Callable]:
    """Decorate ``fn(logits, spec)`` as op ``grape::<backend>_route_topk``."""
    return lambda fn: _kernel_op(
        f"{backend}_route_topk", ROUTE_SCHEMA, fn, _route_fake,
        lambda logits, spec: (logits, *spec_fields(spec)),
        lambda logits, *fields: (logits, RoutingSpec(*fields)),
    )


def align_op(backend: str) -> Callable[[Callable], Callable]:
    """Decorate ``fn(topk_ids, num_experts, block_m)`` as op ``grape::<backend>_align_block_size``."""
    return lambda fn: _kernel_op(
        f"{backend}_align_block_size", ALIGN_SCHEMA, fn, _align_fake, lambda *args: args, lambda *fields: fields
    )
