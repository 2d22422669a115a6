"""The Triton kernels compile for an H100 (sm_90, down to a cubin) and fit its shared memory.

The interpreter tests check what the kernels compute but not that Triton's compiler accepts
them; ``triton_aot.py`` (beside this file) drives the public launchers with the JIT's own
argument specialisation and compiles instead of launching. It must run in a process without
``TRITON_INTERPRET`` (this directory's conftest sets it), hence the subprocess. The default
subset covers every kernel, both gate_up variants, the smallest and largest shipped tiles
and fp32; ``python tests/kernels/triton_aot.py --full`` compiles every shipped config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("triton_aot.py")


def _have_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path).exists()
    except (ImportError, RuntimeError, AttributeError):  # no NVIDIA backend in this Triton build
        return False


@pytest.mark.skipif(not _have_ptxas(), reason="Triton's NVIDIA backend / ptxas is not installed")
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    compiled = [r for r in records if "kernel" in r]
    failed = [r for r in compiled if not r["ok"]]
    assert result.returncode == 0 and not failed, (failed or result.stderr[-4000:])
    kernels = {r["kernel"] for r in compiled}
    expected = {"_route_kernel", "_count_kernel", "_prefix_kernel", "_place_kernel"}
    expected |= {"_gate_up_kernel", "_down_kernel", "_topk_sum_kernel"}
    assert expected <= kernels
    # 16-bit tiles of 64+ rows must reach Hopper tensor cores, and every GEMM must pipeline
    gemms = [r for r in compiled if r["kernel"] in ("_gate_up_kernel", "_down_kernel")]
    assert all(r["cp_async"] > 0 for r in gemms)
    big_16bit = [
        r for r in gemms if int(r["constexprs"]["BLOCK_M"]) >= 64 and r["constexprs"]["INPUT_PRECISION"] == "tf32"
    ]
    assert big_16bit and all(r["wgmma"] > 0 for r in big_16bit)
