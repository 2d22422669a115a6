"""The CUDA sources in csrc/ compile, and the extension links and loads (no GPU needed).

No GPU is available to run these kernels, so compiling them is the check: every ``.cu`` file
goes through nvcc for Ampere and Hopper with warnings (and register spills) as errors, and
the torch binding is compiled with the host compiler against torch's headers, linked with
the kernels into a Python extension, imported, and called once with CPU tensors so that its
own argument checks answer. The device code is torch-free (see csrc/moe_kernels.h), so the
nvcc step does not depend on the installed torch being a CUDA build.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME, include_paths

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CUDA_SOURCES = sorted(CSRC.glob("*.cu"))
CPP_SOURCES = sorted(CSRC.glob("*.cpp"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None and CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        found = str(Path(CUDA_HOME) / "bin" / "nvcc")
    return found


def _cuda_lib_dir(nvcc: str | None) -> Path | None:
    """Directory holding libcudart.so (nvcc may be a wrapper script outside the toolkit)."""
    roots = [CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc is not None:
        roots.append(str(Path(nvcc).resolve().parents[1]))
    for root in filter(None, roots):
        if (Path(root) / "lib64" / "libcudart.so").exists():
            return Path(root) / "lib64"
    return None


NVCC = _nvcc()
CUDA_LIB = _cuda_lib_dir(NVCC)
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"


def test_csrc_has_sources():
    assert CUDA_SOURCES and CPP_SOURCES, f"no CUDA/C++ sources found in {CSRC}"


@needs_nvcc
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, tmp_path):
    _run(
        [
            NVCC,
            "-c",
            "-std=c++17",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
            "--Werror",
            "all-warnings",
            "-Xptxas=-warn-spills,-warn-lmem-usage",
            f"-I{CSRC}",
            str(source),
            "-o",
            str(tmp_path / (source.stem + ".o")),
        ]
    )


@needs_nvcc
@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
@pytest.mark.skipif(CUDA_LIB is None, reason="libcudart.so not found")
def test_extension_builds_links_and_loads(tmp_path):
    objects = []
    for source in CUDA_SOURCES:
        objects.append(tmp_path / (source.stem + ".cu.o"))
        flags = ["-c", "-std=c++17", "-arch=sm_90", "-Xcompiler=-fPIC", f"-I{CSRC}"]
        _run([NVCC, *flags, str(source), "-o", str(objects[-1])])
    torch_includes = [f"-I{path}" for path in include_paths()]
    for source in CPP_SOURCES:
        objects.append(tmp_path / (source.stem + ".o"))
        _run(
            [CXX, "-c", "-fPIC", "-std=c++20", "-Wall", "-Wextra", "-Werror", "-DTORCH_EXTENSION_NAME=_C"]
            + torch_includes
            + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}", str(source), "-o", str(objects[-1])]
        )
    torch_lib = Path(torch.__file__).parent / "lib"
    module_path = tmp_path / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    _run(
        [CXX, "-shared", *map(str, objects), f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
        + [f"-L{CUDA_LIB}", "-lcudart", f"-Wl,-rpath,{CUDA_LIB}", f"-Wl,-rpath,{torch_lib}", "-o", str(module_path)]
    )

    spec = importlib.util.spec_from_file_location("_C", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.route_topk) and callable(module.align_block_size)
    ids = torch.empty((3, 2), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="logits must be a 2-D CUDA tensor"):
        module.route_topk(torch.randn(3, 4), None, ids, torch.empty(3, 2), 2, 0, False, 1.0, 1, 1, 0)
    with pytest.raises(RuntimeError, match="topk_ids must be a 2-D CUDA tensor"):
        module.align_block_size(ids, 4, 16, ids, ids, ids, ids, 0)


def test_cuda_mode_enum_matches_python_codes():
    """The CUDA router's RouteMode enum carries the codes of grape_kernels.routing.MODE_CODES."""
    import re

    from grape_kernels.routing import MODE_CODES

    header = (CSRC / "moe_kernels.h").read_text()
    body = re.search(r"enum class RouteMode : int32_t \{([^}]*)\}", header).group(1)
    enum = {name: int(value) for name, value in re.findall(r"k(\w+) = (\d+)", body)}
    camel = {"".join(part.title() for part in mode.split("_")): code for mode, code in MODE_CODES.items()}
    assert enum == camel
