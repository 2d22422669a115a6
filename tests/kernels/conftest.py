"""This directory's tests: Triton on the interpreter unless a GPU run is requested, one thread.

``triton.jit`` decides at decoration time (when ``grape_kernels.triton`` is first imported)
whether kernels are interpreted, so the variable must be set before that import. A conftest
is collected before the test modules of its directory; a root ``tests/conftest.py`` doing the
same would also protect against another directory importing the kernels first.
Set ``GRAPE_TRITON_TEST_DEVICE=cuda`` on a machine with a GPU to run the same tests natively.
"""

import os

import pytest
import torch

if os.environ.get("GRAPE_TRITON_TEST_DEVICE", "cpu") != "cuda":
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these problems are tiny, and on the shared 2-core machine OpenMP
    barriers in a contended process made single tests 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
