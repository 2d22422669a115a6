"""Drive calibration data through a lazily loaded model, one decoder layer at a time.

The hidden states entering layer l are kept in memory (on the CPU between layers); layer l is
materialised, a *visitor* collects statistics (and may modify the layer, e.g. sparsify it),
layer l's outputs become layer l+1's inputs, and layer l's weights are released. With
``sequential=True`` the outputs are computed after the visitor ran, so later layers calibrate on
what the already-pruned model produces; otherwise they are computed with the original weights.

The keyword arguments each decoder layer needs (attention masks of the layer's attention type,
rotary embeddings, position ids) are recorded by running the model's own forward once with
every decoder layer replaced by a pass-through recorder: no per-architecture mask code here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from grape.errors import InputError
from grape.model_io import LazyCausalLM

__all__ = ["run_layerwise", "NonFiniteActivationError", "LayerVisitor"]

LayerVisitor = Callable[[int, nn.Module, list[torch.Tensor], Callable[[], list[torch.Tensor]]], None]


class NonFiniteActivationError(InputError):
    """NaN or Inf appeared in the activations during calibration."""


class _KwargsRecorder(nn.Module):
    """Stands in for a decoder layer: records its call's keyword arguments, returns its input."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)
        self.kwargs: dict = {}

    def forward(self, hidden_states, *args, **kwargs):
        self.kwargs = kwargs
        return hidden_states


def _record_layer_kwargs(lazy: LazyCausalLM, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Embeddings of ``input_ids`` and the kwargs every decoder layer is called with."""
    base = lazy.model.model
    layers = base.layers
    originals = list(layers)
    recorders = [_KwargsRecorder(layer) for layer in originals]
    captured: dict[str, torch.Tensor] = {}

    def grab_embeddings(_module, _inputs, output):
        captured["hidden"] = output

    for i, recorder in enumerate(recorders):
        layers[i] = recorder
    embed = base.embed_tokens
    handle = embed.register_forward_hook(grab_embeddings)
    lazy.materialize(embed, "model.embed_tokens")
    lazy.materialize(base.norm, "model.norm")
    try:
        with torch.inference_mode():
            base(input_ids=input_ids.to(lazy.device), use_cache=False)
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
        lazy.release(embed)
        lazy.release(base.norm)
    return captured["hidden"], [dict(r.kwargs) for r in recorders]


def run_layerwise(
    lazy: LazyCausalLM,
    input_ids: torch.Tensor,
    visitor: LayerVisitor,
    *,
    batch_size: int = 8,
    sequential: bool = True,
    layers: list[int] | None = None,
    stop_after: int | None = None,
    desc: str = "calibrating",
    experts_in_visitor: bool = False,
) -> None:
    """Call ``visitor(layer_index, layer, hidden_batches, forward)`` for each decoder layer in order.

    Args:
        lazy: the model, opened with :meth:`LazyCausalLM.open`.
        input_ids: (N, L) calibration token ids.
        visitor: receives the materialised layer, the list of (B, L, H) input batches and a
            ``forward()`` callable that runs the layer on all batches with the right attention
            masks and returns the outputs (hooks the visitor installed fire during it). It may
            collect statistics and modify the layer's weights in place.
        sequential: feed the next layer with outputs of the layer *after* the visitor ran.
        layers: visit only these layer indices (others are still run to propagate activations).
        stop_after: stop once this layer index has been visited (later layers are not run).
        experts_in_visitor: visited layers are materialised without their routed experts; the
            visitor reads them (in groups that fit memory) and serves them to the layer's
            forward itself (:func:`grape.calibration.collect.measure_layer`).

    Without ``sequential`` the outputs passed on are those of the layer's first ``forward()``
    (the visitor should call it before modifying weights; ``forward(keep=False)`` runs the
    layer without its outputs counting); with it, the layer is run again after the visitor returns.
    """
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"calibration ids must be a non-empty (samples, seq_len) tensor, got {tuple(input_ids.shape)}")
    batches = list(input_ids.split(batch_size))
    hidden: list[torch.Tensor] = []
    kwargs_per_batch: list[list[dict]] = []
    for ids in batches:
        h, kw = _record_layer_kwargs(lazy, ids)
        hidden.append(h.detach().clone())
        kwargs_per_batch.append(kw)
    wanted = set(range(lazy.num_layers) if layers is None else layers)
    last = lazy.num_layers - 1 if stop_after is None else stop_after
    for index in tqdm(range(last + 1), desc=desc, unit="layer"):
        layer_kwargs = [kw[index] for kw in kwargs_per_batch]
        routed = not (experts_in_visitor and index in wanted)
        with lazy.materialized_layer(index, routed_experts=routed) as layer:

            first: list[list[torch.Tensor]] = []

            def forward(layer=layer, layer_kwargs=layer_kwargs, hidden=hidden, first=first, keep=True) -> list[torch.Tensor]:
                result = layer_forward(layer, hidden, layer_kwargs)
                if keep:
                    first.append(result)
                return result

            if index in wanted:
                visitor(index, layer, hidden, forward)
            outputs = forward() if (sequential or not first) else first[0]
        for out in outputs:
            if not torch.isfinite(out).all():
                raise NonFiniteActivationError(
                    f"NaN/Inf in the output of decoder layer {index} during calibration "
                    f"(try --dtype float32, or check the layer's weights)"
                )
        hidden = outputs


def layer_forward(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """Run a decoder layer on each batch with the recorded keyword arguments."""
    outputs = []
    with torch.inference_mode():
        for h, kw in zip(hidden, kwargs):
            out = layer(h, **kw)
            outputs.append((out[0] if isinstance(out, tuple) else out).detach().clone())
    return outputs
