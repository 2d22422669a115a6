"""One vLLM engine at a time, started the way a user starts it and always shut down."""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from pathlib import Path

# vLLM-CPU sizes its KV cache from this (GiB); 1 fits the tiny and the shared models. The
# variable is ignored on GPUs. Inspecting the built model in the worker (``LLM.apply_model``)
# sends a function to it, which vLLM only allows with this switch.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

MAX_MODEL_LEN = 128


@contextmanager
def vllm_engine(model: Path, dtype: str, **options):
    """A ``vllm.LLM`` on ``model`` with no grape-specific flags, shut down on exit."""
    from vllm import LLM

    llm = LLM(model=str(model), dtype=dtype, max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0, **options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
