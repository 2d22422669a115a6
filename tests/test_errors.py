"""One error path: every failure is one line ``grape <command>: error: ...`` with exit code 2."""

from __future__ import annotations

import errno

import pytest

import grape.cli as cli
from grape.errors import InputError, OutputExistsError, describe_os_error


def test_os_errors_become_one_line_with_the_path_and_the_fix():
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/data/out/shard")) == (
        "/data/out/shard: the disk is full: free some space or choose another --out"
    )
    assert describe_os_error(OSError(errno.EROFS, "Read-only file system", "/ro", None, "/ro/x")).startswith("/ro -> /ro/x: ")
    assert describe_os_error(OSError(errno.EXDEV, "Invalid cross-device link")) == "Invalid cross-device link"
    assert describe_os_error(FileNotFoundError("plain message")) == "plain message"


def test_grape_errors_are_also_the_builtin_a_caller_expects():
    assert issubclass(InputError, ValueError) and issubclass(OutputExistsError, FileExistsError)


@pytest.mark.parametrize(
    ("raised", "line"),
    [
        (InputError("bad value;\n  fix it"), "grape info: error: bad value; fix it"),
        (OSError(errno.EACCES, "Permission denied", "/x"), "grape info: error: /x: permission denied: choose a location you may write to"),
        (TypeError("oops"), "grape info: error: internal error (TypeError: oops); rerun with --debug for the traceback and report it"),
    ],
)
def test_main_prints_one_line_and_exits_2(raised, line, monkeypatch, capsys):
    def fail(args):
        raise raised

    monkeypatch.setattr(cli, "_cmd_info", fail)
    monkeypatch.delenv("GRAPE_DEBUG", raising=False)
    assert cli.main(["info", "x"]) == 2
    assert capsys.readouterr().err.splitlines() == [line]
    with pytest.raises(type(raised)):
        cli.main(["info", "x", "--debug"])


def test_interruptions_are_reported_without_a_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    assert cli.main(["info", "x"]) == 130
    assert capsys.readouterr().err == "grape info: interrupted; no output was written\n"
