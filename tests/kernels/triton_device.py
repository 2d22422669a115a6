"""Where this directory's Triton tests run, and a guard that on the CPU they really are interpreted.

``conftest.py`` beside this file sets ``TRITON_INTERPRET=1`` unless ``GRAPE_TRITON_TEST_DEVICE=cuda``
asks for a GPU run; the tests put their tensors on :data:`DEVICE`.
"""

from __future__ import annotations

import os

DEVICE = "cuda" if os.environ.get("GRAPE_TRITON_TEST_DEVICE") == "cuda" else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


def require_interpreted(kernel: object) -> None:
    """Fail loudly if ``kernel`` was compiled for a GPU although the tests run on the CPU."""
    from triton.runtime.interpreter import InterpretedFunction

    if DEVICE == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "grape_kernels.triton was imported before TRITON_INTERPRET=1 was set; "
            "set it in tests/conftest.py so the kernels run on the interpreter"
        )
