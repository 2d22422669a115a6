import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

SHARED_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "mixtral-8x-pydoc"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Statistics caches go to a per-session temp dir, never the user's ~/.cache."""
    monkeypatch.setenv("GRAPE_CACHE", str(tmp_path_factory.getbasetemp() / "grape-cache"))


@pytest.fixture(scope="session")
def shared_model() -> Path:
    if not (SHARED_MODEL / "config.json").is_file():
        pytest.skip(f"trained test model not found at {SHARED_MODEL} (needs ../shared beside the repo)")
    return SHARED_MODEL
