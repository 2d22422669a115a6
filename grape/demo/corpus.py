"""The demo's corpus: the Python standard library's own sources, split by file name.

The README's first command has to work on a fresh machine with no Hub access and no GPU, and
the only text every Python installation is guaranteed to carry is the standard library's own
source code: the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, in sorted
order, with about 5% of the files held out for evaluation. Files are held out by a hash of
their *name* (not by position or a random draw), so the split is the same on every machine and
does not shift when a Python release adds or removes a module.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grape.files import write_text_atomic

__all__ = ["HELD_OUT_PERCENT", "CALIB_STRIDE", "stdlib_sources", "is_held_out", "split_sources", "Corpus", "write_corpus"]

HELD_OUT_PERCENT = 5
CALIB_STRIDE = 8


def stdlib_sources(stdlib: str | os.PathLike[str] | None = None) -> list[Path]:
    """The top-level ``*.py`` files of the standard library (``stdlib``, default: this
    interpreter's), sorted by name so the corpus does not depend on directory listing order."""
    root = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.py files in the standard library folder {root}")
    return files


def is_held_out(name: str, percent: int = HELD_OUT_PERCENT) -> bool:
    """Whether the file called ``name`` belongs to the evaluation split.

    Decided by SHA-256 of the name alone: stable across machines, Python versions (a module
    keeps its split when others are added) and runs (``hash()`` is salted per process).
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def split_sources(files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """``(train, eval)`` files, each in the order given; neither split may be empty."""
    train = [f for f in files if not is_held_out(f.name)]
    held = [f for f in files if is_held_out(f.name)]
    if not train or not held:
        raise ValueError(
            f"{len(files)} source file(s) give {len(train)} training and {len(held)} held-out "
            "file(s); the demo needs at least one of each"
        )
    return train, held


def _join(files: Sequence[Path]) -> str:
    """The files' text, separated by a blank line (as the shared models' corpora are).

    Undecodable bytes (a vendor-patched stdlib) are replaced rather than fatal: the demo only
    needs plausible text, and the same replacement happens on every run.
    """
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


@dataclass(frozen=True)
class Corpus:
    """The demo's text files: training text, calibration excerpt of it, held-out text."""

    train: Path
    calib: Path
    eval: Path


def write_corpus(work_dir: str | os.PathLike[str], files: Sequence[Path] | None = None) -> Corpus:
    """Write ``train.txt``, ``calib.txt`` and ``eval.txt`` (the split of ``files``, default:
    the stdlib) into ``work_dir``.

    ``calib.txt`` is every ``CALIB_STRIDE``-th training file: text the model was trained on,
    spread over the alphabet of module names, and several times more windows than calibration
    draws. It exists because every ``grape prune`` call tokenises its whole calibration file,
    and the full training text costs seconds of CPU per call, twelve calls per demo.

    A file whose content is already right is left alone, so re-running the demo does not
    touch its inputs.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_files, eval_files = split_sources(files if files is not None else stdlib_sources())
    corpus = Corpus(work / "train.txt", work / "calib.txt", work / "eval.txt")
    texts = (_join(train_files), _join(train_files[::CALIB_STRIDE]), _join(eval_files))
    for path, text in zip((corpus.train, corpus.calib, corpus.eval), texts):
        if not (path.is_file() and path.read_text(encoding="utf-8") == text):
            write_text_atomic(path, text)
    return corpus
