"""Resumable training state: an exact round trip of tensors and optimizer state, no pickle."""

from __future__ import annotations

import pytest
import torch

from grape.errors import InputError
from grape.training_state import load_training_state, save_training_state


def _trained(steps: int) -> tuple[dict[str, torch.nn.Parameter], torch.optim.Optimizer]:
    torch.manual_seed(0)
    params = {"0.gate_up_proj": torch.nn.Parameter(torch.randn(3, 4)), "1.down_proj": torch.nn.Parameter(torch.randn(5))}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        sum((p**2).sum() for p in params.values()).backward()
        optimizer.step()
    return params, optimizer


def test_resuming_continues_exactly_like_the_uninterrupted_run(tmp_path):
    params, optimizer = _trained(3)
    save_training_state(tmp_path / "state.safetensors", trainable=params, optimizer=optimizer.state_dict(),
                        extra={"step": 3, "history": [{"loss": 1.5}], "fingerprint": {"lr": 1e-2}})  # fmt: skip
    reference, ref_optimizer = _trained(5)

    trainable, state, extra = load_training_state(tmp_path / "state.safetensors")
    assert extra == {"step": 3, "history": [{"loss": 1.5}], "fingerprint": {"lr": 1e-2}}
    resumed, resumed_optimizer = _trained(0)
    with torch.no_grad():
        for key, value in trainable.items():
            resumed[key].copy_(value)
    resumed_optimizer.load_state_dict(state)
    for _ in range(2):
        resumed_optimizer.zero_grad()
        sum((p**2).sum() for p in resumed.values()).backward()
        resumed_optimizer.step()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key  # bit for bit
    assert list(tmp_path.iterdir()) == [tmp_path / "state.safetensors"]


@pytest.mark.parametrize("damage", [lambda d: d[: len(d) // 2], lambda d: b"\x80\x04not a state", lambda d: b""])
def test_a_damaged_state_is_one_clear_error(tmp_path, damage):
    params, optimizer = _trained(1)
    path = tmp_path / "state.safetensors"
    save_training_state(path, trainable=params, optimizer=optimizer.state_dict(), extra={"step": 1})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(InputError, match="cannot resume from .*state.safetensors.*delete it or pass --overwrite"):
        load_training_state(path)
