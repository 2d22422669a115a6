"""Run this directory's Triton tests on the Triton interpreter unless a GPU run is requested.

``triton.jit`` decides at decoration time (when ``grape_kernels.triton`` is first imported)
whether kernels are interpreted, so the variable must be set before that import. A conftest
is collected before the test modules of its directory; a root ``tests/conftest.py`` doing the
same would also protect against another directory importing the kernels first.
Set ``GRAPE_TRITON_TEST_DEVICE=cuda`` on a machine with a GPU to run the same tests natively.
"""

import os

if os.environ.get("GRAPE_TRITON_TEST_DEVICE", "cpu") != "cuda":
    os.environ["TRITON_INTERPRET"] = "1"
