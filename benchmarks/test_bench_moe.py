"""pytest-benchmark suite: MoE experts forward of every backend vs transformers eager/grouped_mm.

Not part of the default test run (``testpaths = ["tests"]``); run it with::

    pytest benchmarks/ --benchmark-group-by=param:workload,param:dtype,param:tokens

Each benchmark times one backend on one (workload, dtype, tokens) case with one thread and
CPU time (see ``moe_harness``) and records tokens/s, peak memory and fraction of roofline in
``extra_info``. ``python benchmarks/results.py`` measures the same cases interleaved and writes
the table and plot.
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch
from moe_harness import (
    DTYPES,
    TOKENS,
    backends,
    measure_machine,
    mixtral_narrow,
    peak_memory_bytes,
    pydoc_ragged,
    roofline_fraction,
    run_all,
    set_threads,
    shared_model_available,
)

BACKENDS = backends()
#: CPU time of the calling thread is exact with one intra-op thread; with more, use wall time.
TIMER = time.thread_time if int(os.environ.get("GRAPE_BENCH_THREADS", "1")) == 1 else time.perf_counter


@pytest.fixture(scope="module", autouse=True)
def _threads():
    previous = torch.get_num_threads()
    set_threads(None)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def machine():
    return measure_machine()


@functools.cache
def _pydoc(dtype: str):
    return pydoc_ragged(dtype)


def _workload(name: str, dtype: str, tokens: int):
    if name == "mixtral-narrow":
        return mixtral_narrow(dtype, tokens)
    if not shared_model_available():
        pytest.skip("../shared/models/mixtral-8x-pydoc not found beside the repository")
    return _pydoc(dtype)[tokens]


@pytest.mark.benchmark(timer=TIMER, min_rounds=3, max_time=2.0, warmup=True)
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("workload", ["mixtral-narrow", "pydoc-ragged"])
def test_experts_forward(benchmark, machine, workload, dtype, tokens, backend):
    case = _workload(workload, dtype, tokens)
    call = functools.partial(run_all, BACKENDS[backend], case)
    benchmark.group = f"{workload} {dtype} T={tokens}"
    with torch.inference_mode():
        benchmark(call)
    if benchmark.disabled:  # --benchmark-disable: the call ran once as a smoke test
        return
    seconds = benchmark.stats.stats.median
    fraction, bound = roofline_fraction(case, seconds, machine)
    benchmark.extra_info.update(
        tokens_per_s=tokens / seconds,
        peak_mib=peak_memory_bytes(call) / 2**20,
        roofline_fraction=fraction,
        roofline_bound=bound,
        threads=torch.get_num_threads(),
    )
