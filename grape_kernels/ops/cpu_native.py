"""Build and load the C++ experts loop (``cpu_native.cpp``) the CPU backend runs when it can.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (a C++ compiler
and ninja are needed; 20-60 s, once per torch version, source and CPU) into torch's extensions
cache, ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), and loaded from there
afterwards; torch's file lock makes concurrent first uses build it once.
It is compiled for the CPU it runs on (``-march=native``) against the torch it runs with, so the
build folder's name carries a digest of the source, the flags, the torch version and install
path, the Python version and the CPU's feature flags: a home directory shared by machines of
different CPUs, or by virtual environments, never loads a build made for another one.

Where it cannot be built (no compiler, a torch without the headers) or is switched off with
``GRAPE_CPU_NATIVE=0``, :func:`native_ops` returns None, the reason is logged once, and the CPU
backend runs its Python loop (same method, same results up to float rounding).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from grape_kernels.ops.cpu_prepack import pack_linear_weight

__all__ = ["native_ops", "native_unavailable_reason", "python_loop_only"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_native.cpp")
_NAME = "grape_cpu_native"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"]


def _cpu_flags() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for), or the machine name elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _build_directory() -> Path:
    digest = hashlib.sha256()
    parts = (_SOURCE.read_bytes(), torch.__version__, torch.__file__, sys.version, " ".join(_FLAGS), _cpu_flags())
    for part in parts:
        part = part if isinstance(part, bytes) else part.encode()
        digest.update(part)
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return root / f"{_NAME}-{digest.hexdigest()[:16]}"


@functools.cache
def _load() -> tuple[object | None, str | None]:
    if os.environ.get("GRAPE_CPU_NATIVE", "1") == "0":
        return None, "switched off by GRAPE_CPU_NATIVE=0"
    if not torch.backends.mkldnn.is_available():
        return None, "this torch has no oneDNN"
    from torch.utils import cpp_extension

    directory = _build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / f"{_NAME}.so").is_file():
        logger.warning("grape cpu backend: compiling its C++ loop for this machine, once (20-60 s), in %s", directory)
    try:
        module = cpp_extension.load(
            name=_NAME, sources=[str(_SOURCE)], extra_cflags=_FLAGS,
            build_directory=str(directory), verbose=False,
        )  # fmt: skip
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as error:
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else error}"
        logger.warning("grape cpu backend: the C++ loop could not be built (%s); using the Python loop", reason)
        return None, reason
    try:
        _self_check(module)
    except (RuntimeError, AssertionError) as error:  # e.g. a torch whose oneDNN op changed signature
        reason = f"its self-check failed ({str(error).strip().splitlines()[0]})"
        logger.warning("grape cpu backend: the C++ loop was built but %s; using the Python loop", reason)
        return None, reason
    return module, None


def _self_check(module) -> None:
    """One small call through the packed and the GEMV paths against plain torch, once per process."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 8, generator=generator)
    w_gate_up, w_down = torch.randn(2, 8, 8, generator=generator), torch.randn(2, 8, 4, generator=generator)
    ids, weights = torch.tensor([[0, 1], [1, 0], [1, 1]]), torch.full((3, 2), 0.5)
    packed = [[pack_linear_weight(w) for w in weight] for weight in (w_gate_up, w_down)]
    expected = torch.zeros(3, 8)
    for token, slot in ((t, s) for t in range(3) for s in range(2)):
        gate, up = (w_gate_up[ids[token, slot]] @ hidden[token]).chunk(2)
        expected[token] += 0.5 * (w_down[ids[token, slot]] @ (torch.nn.functional.silu(gate) * up))
    for rows in (slice(None), slice(0, 1)):  # 3 tokens: oneDNN on the packed weights; 1 token: the GEMVs
        gemv = rows.stop == 1
        out = module.cpu_experts(
            hidden[rows], ids[rows], weights[rows], 2, *packed, w_gate_up, w_down, gemv, gemv, None, None, 4,
            False, False, 1.702, 7.0,
        )  # fmt: skip
        assert torch.allclose(out, expected[rows], rtol=1e-4, atol=1e-4), "wrong results"


_python_loop_only = False


def native_ops():
    """The loaded extension (its ``cpu_experts`` function), or None where it cannot be used
    (or inside :func:`python_loop_only`)."""
    return None if _python_loop_only else _load()[0]


@contextlib.contextmanager
def python_loop_only() -> Iterator[None]:
    """Run the cpu backend's Python loop inside the block (process-wide), as a machine without
    a C++ compiler does: how the tests keep that loop tested and the benchmarks measure it."""
    global _python_loop_only
    saved, _python_loop_only = _python_loop_only, True
    try:
        yield
    finally:
        _python_loop_only = saved


def native_unavailable_reason() -> str | None:
    """Why :func:`native_ops` is None (None when it loads)."""
    return _load()[1]
