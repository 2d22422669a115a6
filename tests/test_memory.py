"""The memory budget: sizes as users write them, and the default from the machine."""

from __future__ import annotations

import pytest

from grape.cli import main
from grape.errors import InputError
from grape.memory import available_memory_bytes, memory_budget, parse_memory_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20GB", 20 * 10**9), ("18GiB", 18 * 2**30), ("512MB", 512 * 10**6), ("1.5g", 1_500_000_000), ("1e9", 10**9), (" 7 kib ", 7168)],
)
def test_sizes_as_users_write_them(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "20 parsecs", "-1GB", "0", "1.2.3GB"])
def test_a_bad_size_is_refused_by_value(text):
    with pytest.raises(InputError, match="--max-memory"):
        parse_memory_size(text)


def test_default_budget_is_a_share_of_available_memory():
    available = available_memory_bytes()
    assert 0 < memory_budget(None) <= available
    assert memory_budget(123) == 123


def test_cli_refuses_a_bad_size_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "m", "--method", "frequency", "--experts-ratio", "0.5", "--calib", "c", "--out", "o", "--max-memory", "lots"])
    assert exc.value.code == 2
    assert "--max-memory 'lots' is not a size" in capsys.readouterr().err
