"""Resumable training state as plain data: safetensors for the tensors, JSON for the rest.

``grape distill --resume`` reads back what an interrupted run saved: the trainable tensors, the
optimizer state, the step, the loss history and the settings fingerprint. ``torch.load`` with
``weights_only=True`` would also refuse code, but only through an allow-list of pickle
constructors; a safetensors file holds tensors and one JSON string and nothing else, so it
needs no such trust, and it is the format grape already reads for caches and checkpoints.

The optimizer's ``state_dict`` is flattened generically: every tensor in its per-parameter
state becomes ``optimizer.<param>.<name>``, everything else (step counts that are numbers,
``param_groups``) goes to JSON, so any torch optimizer round-trips exactly.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from grape.errors import InputError

__all__ = ["STATE_FILE", "save_training_state", "load_training_state"]

STATE_FILE = "state.safetensors"
_FORMAT = "grape-training-state"
_VERSION = "1"


def save_training_state(
    path: Path, *, trainable: dict[str, torch.Tensor], optimizer: dict, extra: dict[str, Any]
) -> None:
    """Write the state atomically (unique temporary file, then ``os.replace``).

    Args:
        trainable: the trained tensors by name.
        optimizer: ``optimizer.state_dict()``.
        extra: JSON-able values (step, history, fingerprint, ...).
    """
    tensors = {f"trainable.{k}": v.detach().contiguous().clone() for k, v in trainable.items()}
    state_values: dict[str, dict[str, Any]] = {}
    for param, values in optimizer["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param}.{name}"] = value.detach().contiguous().clone()
            else:
                state_values.setdefault(str(param), {})[name] = value
    document = {"extra": extra, "optimizer_values": state_values, "param_groups": optimizer["param_groups"]}
    data = save_tensors(tensors, {"format": _FORMAT, "version": _VERSION, "state": json.dumps(document)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_training_state(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    """``(trainable, optimizer state_dict, extra)`` as saved by :func:`save_training_state`.

    Raises:
        InputError: the file is missing, truncated, corrupt or not a grape training state.
    """
    try:
        data = path.read_bytes()
        length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
        if metadata.get("format") != _FORMAT or metadata.get("version") != _VERSION:
            raise ValueError("not a grape training state of this version")
        document = json.loads(metadata["state"])
        tensors = load_tensors(data)
    except Exception as exc:  # truncated, corrupt and foreign files all mean: cannot resume from it
        raise InputError(
            f"cannot resume from {path}: {' '.join(str(exc).split()) or type(exc).__name__}; "
            "delete it or pass --overwrite to start over"
        ) from exc
    trainable = {k.removeprefix("trainable."): v for k, v in tensors.items() if k.startswith("trainable.")}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param, name = key.split(".", 2)
            state.setdefault(int(param), {})[name] = value
    for param, values in document["optimizer_values"].items():
        state.setdefault(int(param), {}).update(values)
    return trainable, {"state": state, "param_groups": document["param_groups"]}, document["extra"]
