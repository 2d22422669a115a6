"""Build script for the optional CUDA extension ``grape_kernels._C`` (sources in ``csrc/``).

Everything else about the package lives in ``pyproject.toml`` (package data included: the
tuning table ``grape_kernels/tuning/*.json``); ``MANIFEST.in`` puts ``csrc/`` in sdists.

The extension is built only where it can work: torch importable at build time, torch itself
built with CUDA, and a CUDA toolkit found by ``torch.utils.cpp_extension`` (``CUDA_HOME``);
ninja is used when installed. Anywhere else the package installs without it and says so once;
``grape_kernels.cuda_ops.available()`` then returns False and the Triton / CPU backends are
used. pip builds in an isolated environment without torch by default, so build the extension
with ``pip install --no-build-isolation .``.
"""

from __future__ import annotations

import sys

from setuptools import setup

SOURCES = ["csrc/moe_kernels.cu", "csrc/bindings.cpp"]


def _extension_or_reason():
    """(ext_modules, cmdclass) for the CUDA extension, or a short reason it cannot be built."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not importable in the build environment"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return None, "no CUDA toolkit found (set CUDA_HOME)"
    extension = CUDAExtension(
        name="grape_kernels._C",
        sources=SOURCES,
        include_dirs=["csrc"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return ([extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}), None


built, reason = _extension_or_reason()
if built is None:
    print(f"grape: installing without the optional CUDA extension ({reason}).", file=sys.stderr)
    setup()
else:
    ext_modules, cmdclass = built
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
