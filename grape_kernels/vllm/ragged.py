"""Build vLLM's own MoE models with the per-layer expert counts a grape checkpoint records.

vLLM builds each decoder layer by calling ``make_layers(n, layer_fn, prefix)`` from the model's
module, and each layer reads its routed-expert count from the shared Hugging Face config while
it is constructed (``config.num_local_experts``, ``config.num_experts``,
``config.n_routed_experts``). Everything vLLM derives per layer follows from that one read:
the fused-MoE layer's weights, its router, its checkpoint-name mapping, its expert-parallel
placement (each layer's ``ExpertMapManager``), its weight loader. So a ragged model needs only
that each layer reads *its* count while it is built.

:func:`layerwise_expert_counts` does exactly that, without copying any vLLM code: for the
duration of the stock constructor it wraps the module's ``make_layers`` so that the config's
count attribute holds layer *i*'s count while layer *i* is constructed, and the largest count
(what ``config.json`` stores as the scalar) again afterwards. Whole-model quantities stay the
largest layer's, the rule vLLM itself applies to heterogeneous checkpoints
(``ModelArchitectureConfig.from_layers``): buffers sized by ``get_num_experts()`` fit every layer.

What cannot be per layer is refused by name instead of served wrongly
(:func:`check_parallel_config`): vLLM's expert-parallel load balancer (EPLB) keeps one
``(layers, physical experts)`` table for the whole model, and its EP weight filter picks the
local expert ids of every layer from the model-wide count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

from grape_kernels.ragged_modeling import GRAPE_COUNTS_KEY

__all__ = [
    "RaggedCheckpointError",
    "expert_counts",
    "is_ragged",
    "check_parallel_config",
    "layerwise_expert_counts",
    "built_expert_counts",
]


class RaggedCheckpointError(ValueError):
    """A grape checkpoint's per-layer counts are inconsistent, or a vLLM feature cannot serve them."""


def expert_counts(hf_config) -> list[int | None] | None:
    """The checkpoint's routed experts per decoder layer (None: dense layer), or None if not grape's."""
    counts = getattr(hf_config, GRAPE_COUNTS_KEY, None)
    if not counts:
        return None
    layers = int(hf_config.num_hidden_layers)
    if len(counts) != layers:
        raise RaggedCheckpointError(
            f"{GRAPE_COUNTS_KEY} has {len(counts)} entries for {layers} decoder layers"
        )
    return [None if c is None else int(c) for c in counts]


def is_ragged(counts: Sequence[int | None] | None) -> bool:
    """Whether MoE layers differ in expert count (a uniform grape checkpoint is not ragged)."""
    return len({c for c in counts or () if c is not None}) > 1


def check_parallel_config(vllm_config, counts: Sequence[int | None]) -> None:
    """Refuse the vLLM features that assume one expert count for every layer."""
    if not is_ragged(counts):
        return
    parallel = vllm_config.parallel_config
    if parallel.enable_eplb:
        raise RaggedCheckpointError(
            f"expert-parallel load balancing (--enable-eplb) cannot serve a ragged checkpoint "
            f"(experts per layer {list(counts)}): vLLM's EPLB keeps one table of physical experts "
            f"for all layers. Serve it without --enable-eplb (expert parallelism itself works)."
        )
    if getattr(parallel, "enable_ep_weight_filter", False):
        raise RaggedCheckpointError(
            f"--enable-ep-weight-filter picks every layer's local experts from the model-wide "
            f"count; a ragged checkpoint (experts per layer {list(counts)}) needs it off."
        )


@contextmanager
def _attribute(config, name: str, value) -> Iterator[None]:
    saved = getattr(config, name)
    setattr(config, name, value)
    try:
        yield
    finally:
        setattr(config, name, saved)


@contextmanager
def layerwise_expert_counts(
    model_module: ModuleType, hf_config, count_key: str, counts: Sequence[int | None]
) -> Iterator[None]:
    """While vLLM's model in ``model_module`` is built, layer i sees ``counts[i]`` experts.

    ``model_module`` is the module that defines the stock model class (its ``make_layers`` is
    the one the constructor calls); only that module's name binding is swapped, and only for
    the duration of the ``with`` block.
    """
    from vllm.model_executor.models.utils import extract_layer_index

    stock_make_layers: Callable = model_module.make_layers

    def make_layers(num_hidden_layers: int, layer_fn: Callable, prefix: str):
        def build_layer(prefix: str):
            count = counts[extract_layer_index(prefix)]
            if count is None:
                return layer_fn(prefix=prefix)
            with _attribute(hf_config, count_key, count):
                return layer_fn(prefix=prefix)

        return stock_make_layers(num_hidden_layers, build_layer, prefix)

    model_module.make_layers = make_layers
    try:
        yield
    finally:
        model_module.make_layers = stock_make_layers


def built_expert_counts(model) -> dict[int, int]:
    """Routed experts of each MoE layer as vLLM built it (decoder layer index -> count).

    Run inside a worker with ``LLM.apply_model(built_expert_counts)``; it reads vLLM's own
    fused-MoE layers, so it shows what will execute, not what the config says.
    """
    from vllm.model_executor.layers.fused_moe.runner.moe_runner_interface import MoERunnerInterface
    from vllm.model_executor.models.utils import extract_layer_index

    return {
        extract_layer_index(name): int(module.moe_config.num_logical_experts)
        for name, module in model.named_modules()
        if isinstance(module, MoERunnerInterface)
    }
