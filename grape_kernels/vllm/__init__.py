"""vLLM plugin: serve grape's ragged checkpoints (a different routed-expert count per layer).

vLLM loads this package through the ``vllm.general_plugins`` entry point in every one of its
processes (API server, engine core, workers), so ``vllm serve PRUNED_DIR`` and
``vllm.LLM(model=PRUNED_DIR)`` need no flags and no user code. :func:`register` is all the
entry point calls; it imports vLLM only then, so importing this package never requires vLLM.

What the plugin does (details in the modules):

- :mod:`grape_kernels.vllm.models` defines, for every architecture grape prunes and vLLM
  implements, a subclass of vLLM's own model class that builds each MoE layer on vLLM's fused-MoE
  layer with the layer's own expert count (:mod:`grape_kernels.vllm.ragged`).
- :mod:`grape_kernels.vllm.registration` registers those classes under the names a grape
  checkpoint can carry (``Grape<Architecture>`` from ``auto_map``, or the stock name when
  ``grape_experts_per_layer`` is present) and leaves every other checkpoint to vLLM's classes.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Entry point of ``vllm.general_plugins``: make vLLM recognise grape checkpoints."""
    from grape_kernels.vllm.registration import register_ragged_models

    register_ragged_models()
