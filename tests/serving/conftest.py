"""Fixtures of the serving tests: the trained model pruned by GRAPE.

These tests need vLLM (the serve environment ``.ci/serve_env`` builds); each test module
skips itself when vLLM is not importable, so the default environment collects and skips them.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pruned_shared_model(shared_model, tmp_path_factory) -> Path:
    """The trained Mixtral in ../shared pruned by GRAPE at 50% of its experts."""
    from grape.cli import main as grape_main

    out = tmp_path_factory.mktemp("shared-grape50") / "pruned"
    args = ["prune", str(shared_model), "--method", "grape", "--experts-ratio", "0.5",
            "--calib", str(shared_model / "calib.txt"), "--out", str(out)]
    assert grape_main(args) == 0
    return out
