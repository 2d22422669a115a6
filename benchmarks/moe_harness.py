"""Shared measurement code of the MoE backend benchmarks (``test_bench_moe.py``, ``results.py``).

What is measured: the routed-experts forward of a MoE layer, (T, H) hidden + (T, k) routing
-> (T, H), for transformers' ``eager`` and ``grouped_mm`` experts functions and every grape
backend that can run here, on two workloads:

- ``mixtral-narrow``: one Mixtral-8x7B-shaped layer at reduced width (H=1024, I=3584, E=8,
  top-2), random weights, Mixtral routing of random logits.
- ``pydoc-ragged``: all 8 MoE layers of the trained ``mixtral-8x-pydoc`` model (H=256, I=512,
  top-2) pruned by slicing to 4, 5 or 6 experts (layer i keeps 4 + i % 3), run on the hidden
  states and routing each layer really receives for held-in text. One call = all 8 layers.

How: one intra-op thread by default and CPU time of the calling thread (``time.thread_time``),
because the benchmark machine's 2 cores are shared and wall time there measures the
neighbours as much as the kernels; backends are timed in interleaved rounds (ABCABC...) and
the median is reported, so slow drifts hit all of them alike. Peak memory is the rise of the
process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after
``malloc_trim``) over one call. Fraction of roofline = max(weight bytes the call must read /
measured copy bandwidth, routed FLOPs / measured GEMM rate) / measured time, with bandwidth
(a 256 MiB copy) and GEMM rate (the faster of MKL via ``torch.mm`` and oneDNN on a 2048^3
product) measured in the same process and thread setting.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from transformers.integrations.moe import grouped_mm_experts_forward

from grape_kernels import available_backends, experts_forward
from grape_kernels.ops.cpu_native import native_ops, python_loop_only
from grape_kernels.ops.cpu_prepack import cached_copy
from grape_kernels.ops.vllm_cpu import vllm_cpu_ops, vllm_isa

SHARED_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "mixtral-8x-pydoc"
TOKENS = (1, 16, 128, 1024)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORKLOADS = ("mixtral-narrow", "pydoc-ragged")

ExpertsCall = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LayerInput:
    """One experts module and the (hidden, ids, weights) it is called with."""

    experts: torch.nn.Module
    hidden: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor


@dataclass
class Workload:
    """A list of layer calls timed together, and what an ideal machine would need for them."""

    name: str
    dtype: str
    tokens: int
    layers: list[LayerInput] = field(default_factory=list)

    def weight_bytes(self) -> int:
        """Bytes of expert weights the call must read: every expert that received a token."""
        total = 0
        for layer in self.layers:
            hit = layer.ids.unique().numel()
            per_expert = layer.experts.gate_up_proj[0].numel() + layer.experts.down_proj[0].numel()
            total += hit * per_expert * layer.experts.gate_up_proj.element_size()
        return total

    def flops(self) -> int:
        """Multiply-adds x 2 of the routed work: (token, expert) pairs through both projections."""
        return sum(
            2 * layer.ids.numel() * (layer.experts.gate_up_proj[0].numel() + layer.experts.down_proj[0].numel())
            for layer in self.layers
        )


def backends() -> dict[str, ExpertsCall]:
    """transformers' baselines, each grape backend that runs on the CPU here, and vLLM's kernel.

    Triton joins only with CUDA: under the interpreter it checks correctness, not speed.
    ``vllm-fused`` (vLLM's fused CPU MoE kernel on every call, its packed weights made once)
    joins where vLLM's CPU build imports; ``grape-vllm_cpu`` is grape's backend that uses it
    only where it measured faster. ``grape-cpu-python`` is the ``cpu`` backend's Python loop,
    the fallback its C++ loop replaced, measured beside it.
    """
    calls: dict[str, ExpertsCall] = {
        "eager": lambda m, h, i, w: type(m).forward.__wrapped__(m, h, i, w),
        "grouped_mm": grouped_mm_experts_forward,
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("cpu", "vllm_cpu", "triton", "dense", "reference"):
        if name in available_backends(device) and (name != "triton" or device == "cuda"):
            calls[f"grape-{name}"] = lambda m, h, i, w, _b=name: experts_forward(m, h, i, w, backend=_b)
    if "grape-cpu" in calls and native_ops() is not None:
        calls["grape-cpu-python"] = python_loop
    if device == "cpu" and vllm_cpu_ops() is not None:
        calls["vllm-fused"] = vllm_fused
    return calls


def python_loop(experts: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """grape's ``cpu`` backend with its C++ loop off: what a machine without a C++ compiler runs."""
    with python_loop_only():
        return experts_forward(experts, hidden, ids, weights, backend="cpu")


def vllm_fused(experts: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """vLLM's fused CPU MoE kernel on a SiLU experts module, as vLLM's own CPU MoE layer calls it."""
    ops, isa = vllm_cpu_ops(), vllm_isa(hidden.dtype)
    w13 = cached_copy(experts.gate_up_proj, f"vllm-{isa}", lambda w: ops.cpu_prepack_moe_weight(w, isa))
    w2 = cached_copy(experts.down_proj, f"vllm-{isa}", lambda w: ops.cpu_prepack_moe_weight(w, isa))
    out = torch.empty_like(hidden)
    ops.cpu_fused_moe(out, hidden, w13, w2, None, None, weights.float(), ids.to(torch.int32), "silu", isa, False)
    return out


def run_all(call: ExpertsCall, workload: Workload) -> None:
    for layer in workload.layers:
        call(layer.experts, layer.hidden, layer.ids, layer.weights)


# ---- workloads --------------------------------------------------------------------------------
def mixtral_narrow(dtype: str, tokens: int, seed: int = 0) -> Workload:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    g = torch.Generator().manual_seed(seed)
    config = MixtralConfig(hidden_size=1024, intermediate_size=3584, num_local_experts=8, num_experts_per_tok=2)
    experts = MixtralExperts(config).requires_grad_(False)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.02)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.02)
    experts.to(DTYPES[dtype])
    probs = torch.randn(tokens, 8, generator=g).softmax(-1)
    weights, ids = probs.topk(2, dim=-1)
    weights /= weights.sum(-1, keepdim=True)
    hidden = torch.randn(tokens, 1024, generator=g).to(DTYPES[dtype])
    return Workload("mixtral-narrow", dtype, tokens, [LayerInput(experts, hidden, ids, weights)])


def _pydoc_model(dtype: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SHARED_MODEL, dtype=DTYPES[dtype], experts_implementation="eager")
    model.eval().requires_grad_(False)
    for index, layer in enumerate(model.model.layers):
        keep = torch.arange(4 + index % 3)
        for module in (layer.mlp.gate, layer.mlp.experts):
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, torch.nn.Parameter(param.index_select(0, keep).clone(), requires_grad=False))
            module.num_experts = keep.numel()
    return model


def pydoc_ragged(dtype: str, token_counts: tuple[int, ...] = TOKENS) -> dict[int, Workload]:
    """Per token count, the 8 layers' experts inputs captured from one forward on calib text."""
    from transformers import AutoTokenizer

    model = _pydoc_model(dtype)
    tokenizer = AutoTokenizer.from_pretrained(SHARED_MODEL)
    text = (SHARED_MODEL / "calib.txt").read_text(encoding="utf-8")[:20000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : max(token_counts)]
    captured: list[tuple] = []
    hooks = [
        layer.mlp.experts.register_forward_pre_hook(lambda m, args: captured.append((m, *args)))
        for layer in model.model.layers
    ]
    with torch.inference_mode():
        model(ids)
    for hook in hooks:
        hook.remove()
    return {
        tokens: Workload(
            "pydoc-ragged", dtype, tokens,
            [LayerInput(m, h[:tokens].clone(), i[:tokens].clone(), w[:tokens].clone()) for m, h, i, w in captured],
        )
        for tokens in token_counts
    }


def shared_model_available() -> bool:
    return (SHARED_MODEL / "config.json").is_file()


# ---- measurement ------------------------------------------------------------------------------
def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: $GRAPE_BENCH_THREADS or 1); returns the count."""
    threads = threads or int(os.environ.get("GRAPE_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def timer() -> Callable[[], float]:
    """Thread CPU time with one thread (immune to time slices lost to neighbours), else wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _last_level_cache_bytes() -> int:
    """Size of the CPU's last-level cache (Linux sysfs), 32 MiB where it cannot be read."""
    caches = Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = []
    for index in caches.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 << 20)


def evict_caches(buffer: torch.Tensor) -> None:
    """Overwrite ``buffer`` (twice the last-level cache): whatever the previous call left cached is gone."""
    buffer.add_(1)


def race(calls: dict[str, Callable[[], object]], min_rounds: int, budget_s: float) -> dict[str, float]:
    """Median seconds per call of each callable, timed in interleaved rounds after one warm-up.

    Every timed call starts from the same state: right after an untimed call of the same
    callable (its allocations are then served as in a model running layer after layer), with a
    buffer twice the last-level cache written in between (its weights are cold, as they are
    behind other layers' weights in a real model). Without the first step the contender run
    after ``grouped_mm`` paid for fresh allocations and the next one did not: on the pruned
    model at 16 tokens the identical ``cpu`` path timed 1.46x or 1.71x over transformers
    depending on its place in the round.
    """
    clock = timer()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    flush = torch.zeros(2 * _last_level_cache_bytes() // 4, dtype=torch.float32)
    with torch.inference_mode():
        for call in calls.values():
            call()
        start = time.perf_counter()
        rounds = 0
        while rounds < min_rounds or time.perf_counter() - start < budget_s:
            for name, call in calls.items():
                call()
                evict_caches(flush)
                t0 = clock()
                call()
                samples[name].append(clock() - t0)
            rounds += 1
            if rounds >= 200:
                break
    return {name: statistics.median(values) for name, values in samples.items()}


_LIBC = ctypes.CDLL("libc.so.6") if os.path.exists("/proc/self/clear_refs") else None


def peak_memory_bytes(call: Callable[[], object]) -> int:
    """Rise of peak RSS over one call (Linux VmHWM; elsewhere the RSS delta after the call)."""
    process = psutil.Process()
    with torch.inference_mode():
        if _LIBC is None:
            before = process.memory_info().rss
            call()
            return max(0, process.memory_info().rss - before)
        _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = process.memory_info().rss
        call()
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
    return max(0, peak - before)


@dataclass(frozen=True)
class Machine:
    """Measured copy bandwidth (bytes/s) and GEMM rate per dtype (FLOP/s), same process/threads."""

    bandwidth: float
    gemm_rate: dict[str, float]


def measure_machine() -> Machine:
    clock = timer()
    src = torch.ones(64 << 20)  # 256 MiB, far beyond the last-level cache
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = clock()
        dst.copy_(src)
        best = min(best, clock() - t0)
    bandwidth = 2 * src.numel() * src.element_size() / best
    gemms = [lambda a: torch.mm(a, a)]
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if onednn is not None:
        gemms.append(lambda a: onednn(a, a, None, "none", [None], ""))
    rates = {}
    for name, dtype in DTYPES.items():
        a = torch.randn(2048, 2048).to(dtype)
        best = float("inf")
        for gemm in gemms:
            for _ in range(3):
                t0 = clock()
                gemm(a)
                best = min(best, clock() - t0)
        rates[name] = 2 * 2048**3 / best
    return Machine(bandwidth, rates)


def roofline_fraction(workload: Workload, seconds: float, machine: Machine) -> tuple[float, str]:
    """(ideal time / measured time, which bound the ideal is): memory or compute."""
    memory_time = workload.weight_bytes() / machine.bandwidth
    compute_time = workload.flops() / machine.gemm_rate[workload.dtype]
    bound = "memory" if memory_time >= compute_time else "compute"
    return max(memory_time, compute_time) / seconds, bound
