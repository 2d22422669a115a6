"""The memory budget (sizes as users write them, the default from the machine) and the capped matmul caches."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grape.cli import main
from grape.errors import InputError
from grape.memory import available_memory_bytes, bound_kernel_caches, memory_budget, parse_memory_size

_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20GB", 20 * 10**9), ("18GiB", 18 * 2**30), ("512MB", 512 * 10**6), ("1.5g", 1_500_000_000), ("1e9", 10**9), (" 7 kib ", 7168)],
)
def test_sizes_as_users_write_them(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "20 parsecs", "-1GB", "0", "1.2.3GB"])
def test_a_bad_size_is_refused_by_value(text):
    with pytest.raises(InputError, match="--max-memory"):
        parse_memory_size(text)


def test_default_budget_is_a_share_of_available_memory():
    available = available_memory_bytes()
    assert 0 < memory_budget(None) <= available
    assert memory_budget(123) == 123


def test_cli_refuses_a_bad_size_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "m", "--method", "frequency", "--experts-ratio", "0.5", "--calib", "c", "--out", "o", "--max-memory", "lots"])
    assert exc.value.code == 2
    assert "--max-memory 'lots' is not a size" in capsys.readouterr().err


_CLI_THEN_DISTINCT_MATMULS = """
import ctypes, json, sys
from grape.cli import main

status = main(["prune", sys.argv[1], "--method", "frequency", "--experts-ratio", "0.5", "--calib", "c", "--out", sys.argv[2]])
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2


def allocated():
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd  # heap chunks in use + memory-mapped ones


weight = torch.randn(96, 64, dtype=torch.bfloat16)
tokens = torch.randn(201, 64, dtype=torch.bfloat16)
torch.nn.functional.linear(tokens[:1], weight)
before = allocated()
for rows in range(2, tokens.shape[0] + 1):  # a new row count each call, as a routed expert sees
    torch.nn.functional.linear(tokens[:rows], weight)
print(json.dumps({"status": status, "grown": allocated() - before}))
"""


def test_prune_caps_the_matmul_caches_before_they_exist(tmp_path):
    """What calibration's memory grew by per layer: oneDNN and ideep keep a compiled matmul for
    every distinct shape (about 0.55 MB each, up to 1024 of each), and a routed expert's matmul
    has a new row count on almost every call. In a fresh process (the caches read their size
    once, at the first oneDNN primitive), ``grape prune`` caps them before any primitive exists
    (importing grape and grape_kernels makes none), and afterwards 200 new shapes hold no more
    than the capped caches do (measured: 8 MiB; 108 MiB with the default caches)."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc's mallinfo2 is needed to count the allocated bytes")
    # this process may have capped them already: the child must do it itself
    env = {k: v for k, v in os.environ.items() if k not in _CACHE_VARIABLES}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    args = [str(tmp_path / "no-model"), str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-c", _CLI_THEN_DISTINCT_MATMULS, *args], env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["status"] == 2  # the missing model is refused; the caps came first
    assert result["grown"] < 24 * 2**20, f"200 distinct matmul shapes kept {result['grown'] / 2**20:.0f} MiB"


@pytest.fixture
def no_cache_sizes(monkeypatch):
    """The cache variables unset for the test, and restored (absent or not) afterwards."""
    for name in _CACHE_VARIABLES:
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)


def test_a_cache_size_the_user_chose_is_kept(no_cache_sizes, monkeypatch):
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "300")  # oneDNN's older spelling
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    bound_kernel_caches()
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"


def test_commands_that_serve_keep_the_default_caches(no_cache_sizes, tmp_path, capsys):
    """Decode's shapes recur, and with 16 entries generate ran 1.8x slower (grape.memory)."""
    assert main(["eval", str(tmp_path / "no-model"), "--ppl", str(tmp_path / "no-text")]) == 2
    assert not any(name in os.environ for name in _CACHE_VARIABLES)
