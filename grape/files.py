"""Writing files safely: atomically (temporary sibling + ``os.replace``), with the user's umask.

A reader of any file grape writes sees either the old complete file or the new complete one,
never a truncated file left by an interrupted run: the content goes to a temporary file in the
destination folder (so the final rename stays on one file system, where it is atomic) and is
renamed into place at the end. ``tempfile.mkstemp`` creates its file with mode 0600 whatever
the umask, and some writers (safetensors) do the same, so :func:`apply_user_modes` sets what an
ordinary ``open()`` would have given: ``0o666 & ~umask`` for files, ``0o777 & ~umask`` for
directories.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["human_bytes", "user_mode", "apply_user_modes", "write_atomic", "write_text_atomic"]


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.50 KiB"``: file sizes in messages and summaries."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.2f} {unit}"


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_mode(*, directory: bool = False) -> int:
    """The mode ``open()``/``mkdir()`` would give a new file (directory) under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def apply_user_modes(root: Path) -> None:
    """Give ``root`` and everything below it the modes the user's umask asks for."""
    file_mode, dir_mode = user_mode(), user_mode(directory=True)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, dir_mode if path.is_dir() else file_mode)


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    On any error (or interruption) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, user_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, flushed to disk before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return write_atomic(path, write)
