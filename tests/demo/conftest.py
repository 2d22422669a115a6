"""Shared fixtures of the demo tests: one thread, a few small stdlib files."""

from pathlib import Path

import pytest

from grape.demo.corpus import split_sources, stdlib_sources


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Train and evaluate on one thread: on a loaded CI machine a two-thread pool is several
    times slower, and these tests check mechanics, not speed."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def small_sources() -> list[Path]:
    """A few small stdlib files, including at least one held-out file."""
    files = [f for f in stdlib_sources() if f.stat().st_size < 8000]
    train, held = split_sources(files)
    return sorted(train[:6] + held[:1])
