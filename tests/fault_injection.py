"""Deliver a signal to this process at a chosen point of a grape command (for the safety tests).

    python tests/fault_injection.py STAGE SIGNAL grape-arguments...

STAGE is ``calibrate`` (right after the first layer's calibration result is on disk: a cached
layer, a sparsified layer, a saved training state) or ``write`` (after the first decoder layer
went into the checkpoint being written). The same patches serve in-process tests through
:func:`patches`.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _targets(stage: str, command: str) -> tuple[object, str, int]:
    """(owner, attribute, call number after which the signal is sent)."""
    if stage == "write":  # the second layer's tensors are asked for once the first is written
        import grape.checkpoint

        return grape.checkpoint, "layer_tensors", 2
    if command == "prune":
        import grape.calibration.cache

        return grape.calibration.cache.StatsCache, "save", 1
    if command == "sparsify":
        import grape.sparsity.sparsify

        return grape.sparsity.sparsify, "sparsify_experts", 1
    import grape.distill_training

    return grape.distill_training, "save_training_state", 1


def patches(stage: str, command: str, signum: int) -> tuple[object, str, Callable]:
    """The (owner, name, replacement) that sends ``signum`` to this process at ``stage``."""
    owner, name, after = _targets(stage, command)
    original = getattr(owner, name)
    calls = []

    def replacement(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == after:
            os.kill(os.getpid(), signum)
        return result

    return owner, name, replacement


if __name__ == "__main__":
    stage, signame, *grape_args = sys.argv[1:]
    owner, name, replacement = patches(stage, grape_args[0], getattr(signal, signame))
    setattr(owner, name, replacement)
    from grape.cli import main

    sys.exit(main(grape_args))
