"""The errors grape reports to a user, and how an OS error becomes one readable line.

Every failure the user can fix (bad input, a busy or unsafe output location, a full disk)
is a :class:`GrapeError`: ``grape <command>`` prints its message as one line and exits with
status 2, and only ``--debug`` (or ``GRAPE_DEBUG=1``) shows a traceback. The concrete classes
also derive from the built-in exception a Python caller would expect (``ValueError`` for bad
values, ``FileExistsError`` for an existing output), so library code can catch either.

Messages name the problem *and* the fix ("... exists; pass --overwrite to replace it"), and
carry no newline: the command line prints them as they are.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "GrapeError",
    "InputError",
    "OutputError",
    "OutputExistsError",
    "OutputBusyError",
    "GrapeWarning",
    "describe_os_error",
]


class GrapeError(Exception):
    """A failure the user can fix; its message is the one line the command line prints."""


class InputError(GrapeError, ValueError):
    """An input (model, data, option, device) is missing, malformed or out of range."""


class OutputError(GrapeError, OSError):
    """The output cannot be written where it was asked for (unsafe, unwritable, too small)."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and may not be replaced (no ``--overwrite``, or not a grape output)."""


class OutputBusyError(OutputError):
    """Another grape run is writing the same output right now."""


class GrapeWarning(UserWarning):
    """Something was recovered from (e.g. a corrupt cache file recomputed); printed as one line."""


_OS_REASONS = {
    errno.ENOSPC: "the disk is full: free some space or choose another --out",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another --out",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.EACCES: "permission denied: choose a location you may write to",
    errno.EPERM: "operation not permitted: choose a location you may write to",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EISDIR: "it is a directory",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and what to do."""
    reason = _OS_REASONS.get(exc.errno or -1) or exc.strerror or str(exc) or type(exc).__name__
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(os.fsdecode(p) for p in paths)
    return f"{where}: {reason}" if where else reason
