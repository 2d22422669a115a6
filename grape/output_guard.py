"""The one guard between a grape command and its output directory.

Every command that writes a directory (prune, sparsify, distill, the demo's model) goes through
:func:`claim_output` before any heavy work, and the rules live here only:

1. ``--out`` never equals, contains or lies inside an input (the model, the teacher, the
   calibration data, the statistics cache), compared after resolving symlinks. Writing there
   would mix the output into an input or, with ``--overwrite``, delete it.
2. An existing ``--out`` is replaced only with ``--overwrite``, and only when it is an empty
   directory or a previous output of the same kind: a directory holding the *marker* file
   (``grape_report.json`` for checkpoints) whose entries are all listed in the marker's
   ``"files"`` (outputs written before that list existed: plain files only). A regular file, a
   folder of the user's notes or a grape output the user added files to is refused by name.
3. The output is *claimed*: an exclusive ``flock`` on ``.NAME.grape-lock`` beside it, held
   until the end. A second run on the same ``--out`` is refused at once instead of silently
   replacing the first run's result. The kernel drops the lock of a process that dies, however
   it dies (SIGKILL included), so a stale lock never needs guessing from PIDs or clocks.
4. The new output is assembled in ``.NAME.grape-tmp-PID`` and renamed into place by
   :meth:`OutputClaim.commit` (the state of ``--out`` is checked again first, under the lock);
   a replaced output goes to ``.NAME.grape-old-PID`` and is deleted only once the new one is in
   place. Whoever holds the lock knows that every other ``.NAME.grape-tmp-*`` or
   ``.NAME.grape-old-*`` belongs to a run that is gone, and removes it (a SIGKILL leaves them).
5. The location must be writable and hold the estimated output size; both are checked here,
   before calibration, not discovered after an hour of work.
6. Modes follow the user's umask (:func:`grape.files.apply_user_modes`) before the rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

from grape.errors import GrapeWarning, OutputBusyError, OutputError, OutputExistsError, describe_os_error
from grape.files import apply_user_modes, human_bytes

__all__ = ["REPORT_FILE", "OutputClaim", "claim_output", "check_disjoint"]

REPORT_FILE = "grape_report.json"
"""The marker of a grape checkpoint: the report every checkpoint carries."""


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def check_disjoint(out: str | os.PathLike[str], inputs: Mapping[str, str | os.PathLike[str] | None]) -> Path:
    """The resolved ``out``, unless it equals, contains or lies inside one of ``inputs``.

    ``inputs`` maps what an input is ("input model", "teacher", ...) to its path; None entries
    (an input the command does not have) are skipped.

    Raises:
        OutputError: naming the input and the fix.
    """
    target = _resolved(out)
    for what, path in inputs.items():
        if path is None:
            continue
        source = _resolved(path)
        if target == source:
            raise OutputExistsError(
                f"--out {target} is the {what}: grape never modifies its input; choose another --out"
            )
        if target in source.parents:
            raise OutputError(
                f"--out {target} contains the {what} {source}: grape never writes over its inputs; "
                "choose another --out"
            )
        if source in target.parents:
            raise OutputError(
                f"--out {target} lies inside the {what} {source}: grape never writes into its inputs; "
                "choose another --out"
            )
    return target


def _why_not_replaceable(out: Path, marker: str) -> str | None:
    """None when ``--overwrite`` may replace ``out``, else the reason it may not."""
    if not out.is_dir():
        return "it is not a directory"
    entries = sorted(out.iterdir())
    if not entries:
        return None
    try:
        record = json.loads((out / marker).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it is not empty and holds no {marker}, so it is not a grape output"
    except (OSError, UnicodeDecodeError, ValueError):
        return f"its {marker} is unreadable, so it cannot be recognised as a grape output"
    if not isinstance(record, dict):
        return f"its {marker} is not a grape record"
    listed = record.get("files")
    if isinstance(listed, list):
        unknown = [p.name for p in entries if p.name not in set(listed) | {marker}]
    else:  # written before outputs listed their files: a grape output holds plain files only
        unknown = [p.name + "/" for p in entries if p.is_dir() or p.is_symlink()]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        return f"it holds files grape did not write ({shown})"
    return None


def _check_target(out: Path, *, overwrite: bool, marker: str) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(f"output directory {out} exists; pass --overwrite to replace it")
    reason = _why_not_replaceable(out, marker)
    if reason is not None:
        raise OutputExistsError(
            f"--overwrite will not replace {out}: {reason}; move it away or choose another --out"
        )


class OutputClaim:
    """An output location claimed by this process; see the module docs for the protocol.

    Use as a context manager: leaving the block without :meth:`commit` (an error, Ctrl-C,
    SIGTERM) removes the temporary directory and releases the lock, so nothing is left behind.
    """

    def __init__(self, out: Path, *, overwrite: bool, marker: str, lock: Path, lock_fd: int) -> None:
        self.out = out
        self.overwrite = overwrite
        self.marker = marker
        self.tmp = out.parent / f".{out.name}.grape-tmp-{os.getpid()}"
        self._lock, self._lock_fd = lock, lock_fd
        self.committed = False

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.committed:
            self.abort()

    def commit(self) -> Path:
        """Move the finished temporary directory to ``out`` (replacing a previous output)."""
        _check_target(self.out, overwrite=self.overwrite, marker=self.marker)
        apply_user_modes(self.tmp)
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / f".{self.out.name}.grape-old-{os.getpid()}"
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        self.committed = True
        self._release()
        return self.out

    def abort(self) -> None:
        """Remove the temporary directory and release the claim (idempotent)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._lock)  # while still holding it: see _lock_output
        os.close(self._lock_fd)
        self._lock_fd = -1


def _lock_output(out: Path) -> tuple[Path, int]:
    """Take the exclusive lock of ``out``; raises OutputBusyError if another run holds it.

    The lock file is removed when released; a run that opened it just before may then lock an
    unlinked file, so after locking we check that the path still names the file we hold.
    """
    lock = out.parent / f".{out.name}.grape-lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise OutputBusyError(
                f"another grape run ({owner}) is writing {out}; wait for it to finish or choose another --out"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    record = json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return lock, fd


def _read_owner(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {record['pid']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def _remove_leftovers(out: Path) -> None:
    """Delete the temporary/old siblings of ``out`` left by runs that were killed."""
    pattern = f".{glob.escape(out.name)}.grape-"
    leftovers = sorted(out.parent.glob(pattern + "tmp-*")) + sorted(out.parent.glob(pattern + "old-*"))
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if leftovers:
        names = ", ".join(p.name for p in leftovers)
        warnings.warn(f"removed what an interrupted run left beside {out}: {names}", GrapeWarning, stacklevel=3)


def claim_output(
    out: str | os.PathLike[str],
    *,
    inputs: Mapping[str, str | os.PathLike[str] | None],
    overwrite: bool,
    needed_bytes: int = 0,
    marker: str = REPORT_FILE,
) -> OutputClaim:
    """Check and claim ``out`` for this run; write into ``claim.tmp``, then ``claim.commit()``.

    Args:
        out: the output directory asked for.
        inputs: what each input is -> its path (see :func:`check_disjoint`).
        overwrite: whether a previous output may be replaced (see the module docs).
        needed_bytes: the estimated size of the output; refused if the file system has less free.
        marker: the file that marks a previous output of this kind.

    Raises:
        OutputError / OutputExistsError / OutputBusyError: naming the problem and the fix.
    """
    target = check_disjoint(out, inputs)
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(f"parent directory of the output {parent} does not exist; create it first")
    _check_target(target, overwrite=overwrite, marker=marker)
    free = shutil.disk_usage(parent).free
    if needed_bytes > free:
        raise OutputError(
            f"not enough free space for {target}: the output needs about {human_bytes(needed_bytes)}, "
            f"{parent} has {human_bytes(free)} free; free some space or choose another --out"
        )
    try:
        lock, fd = _lock_output(target)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"cannot write the output {target}: {describe_os_error(exc)}") from exc
    claim = OutputClaim(target, overwrite=overwrite, marker=marker, lock=lock, lock_fd=fd)
    try:
        _check_target(target, overwrite=overwrite, marker=marker)  # again, now that no other run can change it
        _remove_leftovers(target)
        claim.tmp.mkdir()
    except BaseException as exc:
        claim.abort()
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"cannot write the output {target}: {describe_os_error(exc)}") from exc
        raise
    return claim
