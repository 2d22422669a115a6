"""The memory budget of a run: ``--max-memory`` parsed, or what the machine has available.

One place for the fact "how much memory may this run use", read by calibration (how many
experts to materialise at once) and by the dry run (refuse a run that cannot fit before heavy
work). Sizes are bytes everywhere inside grape; only this module reads the user's spelling.

It also holds the process's side of "one layer at a time": glibc's thresholds and trims, so that
freed tensors leave the resident set, and the caps on oneDNN's per-shape matmul caches.
"""

from __future__ import annotations

import os
import re

from grape.errors import InputError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip

DEFAULT_FRACTION = 0.9
"""Share of the machine's available memory a run may use when ``--max-memory`` is not given:
the rest is head-room for the page cache of the checkpoint being read and for other programs."""


def parse_memory_size(text: str) -> int:
    """``"20GB"``, ``"18GiB"``, ``"512MB"``, ``"1e9"`` -> bytes; raises InputError naming the value."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise InputError(f"--max-memory {text!r} is not a size; write it like 20GB, 18GiB or 512MB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InputError(f"--max-memory {text!r} must be more than zero")
    return value


def _proc_kib(path: str, field: str) -> int | None:
    """Bytes of a ``field:  N kB`` line of a /proc file; None where there is no such file (not Linux)."""
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes() -> int:
    """Memory the kernel says a new allocation can get now (``MemAvailable``), or total RAM
    where /proc/meminfo is not there (not Linux)."""
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(max_memory: int | None) -> int:
    """The bytes this run may hold: ``max_memory`` when given, else a share of what is available."""
    if max_memory is not None:
        return max_memory
    return int(available_memory_bytes() * DEFAULT_FRACTION)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_THRESHOLD_BYTES = 128 << 10


def return_freed_memory_promptly() -> None:
    """Make freed tensors leave the process's resident memory at once (glibc; elsewhere a no-op).

    glibc serves allocations above a threshold with their own memory maps, returned to the
    system when freed, but it raises that threshold to the size of each large block freed (up to
    32 MB), and the heap's trim threshold to twice that. After the first layer is released, a
    layer's tensors of a few MB come from the heap, whose freed holes stay resident: measured,
    +30% peak RSS from 8 to 16 layers for prune, none with the thresholds held at their initial
    128 KiB (``benchmarks/memory_depth.py``). Setting them explicitly turns the raising off.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):  # not glibc: the allocator keeps its own policy
        libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD_BYTES)


KERNEL_CACHE_ENTRIES = 16
"""Compiled matmuls oneDNN, and PyTorch's ideep layer above it, each keep during calibration
(default 1024 each).

Both caches are keyed by the exact shapes, and in calibration a routed expert's matmul has a new
row count on almost every call (the tokens routed to it, anywhere from 0 to all of them), so
every expert of every layer adds entries of about 0.55 MB together (measured: 200 distinct
shapes, 108 MiB) until each cache holds 1024: calibration's resident memory grew 16 MiB per MoE
layer of ``benchmarks/memory_depth.py`` with no tensor left behind (about half of its +15 %
peak from 8 to 16 layers). A miss costs 0.2-0.4 ms to create the primitive (measured; one
expert's matmul on 512 tokens of hidden 1024 takes 7 ms), and prune and sparsify ran no slower
end to end with 16 entries. Serving is the opposite case: its shapes recur (decode routes at
most batch x top-k tokens to an expert), and with 16 entries transformers' ``generate`` of a
pruned bf16 model ran 1.8x slower at batch 16, so only the calibrating commands cap the caches."""

_KERNEL_CACHE_VARIABLES = {
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"),
    "LRU_CACHE_CAPACITY": ("LRU_CACHE_CAPACITY",),  # ideep's; 0 crashes it, hence a count above zero
}  # the variable grape sets -> the spellings under which a user may already have chosen a size


def bound_kernel_caches() -> None:
    """Cap oneDNN's and ideep's caches of compiled matmuls at :data:`KERNEL_CACHE_ENTRIES` each.

    Per-shape caches grow with depth where the shapes are data-dependent (see the constant).
    PyTorch exposes no call that resizes them; each library reads its environment variable
    once, when it creates its first primitive (no grape module makes one at import: the
    kernels' oneDNN probes run at first use). So ``grape prune`` and ``grape sparsify`` call this
    once their arguments are parsed (``grape/cli.py``); a Python program calibrating through
    grape's API calls it before its first matmul. In a process that already made a oneDNN
    primitive, the caches keep their default size. A size the user set is kept.
    """
    for variable, spellings in _KERNEL_CACHE_VARIABLES.items():
        if not any(name in os.environ for name in spellings):
            os.environ[variable] = str(KERNEL_CACHE_ENTRIES)


def trim_freed_memory() -> None:
    """Hand the free pages inside the allocator's heaps back to the system (glibc ``malloc_trim``).

    Called when a layer is released: the holes its tensors leave in the heap would otherwise stay
    resident, and with every layer a little more of them (fragmentation) is never reused.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:  # no C library to load: the allocator keeps its own policy
        return None


def resident_bytes() -> int:
    """This process's resident memory now (``VmRSS``): the interpreter and the libraries a run
    imports; the peak so far where /proc is not there."""
    resident = _proc_kib("/proc/self/status", "VmRSS")
    if resident is not None:
        return resident
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
