"""grape's local lm-eval tasks: YAML task definitions over JSON-lines files, built on demand.

lm-eval's own tasks download their data from the Hugging Face Hub, which many machines (this
project's CI included) cannot reach. lm-eval also reads tasks from any folder of YAML files
(``TaskManager(include_path=...)``) whose data is a local file (``dataset_path: json``), so
grape writes such a folder, in a temporary directory, for the tasks a run asks for:

- ``grape_stdlib_next_line``: the next-line task (:mod:`grape.tasks.next_line`) over the
  held-out files of this interpreter's standard library, split exactly as ``grape demo`` splits
  them (:func:`grape.demo.split_sources`), so it is held-out text for the demo's model and
  needs nothing but Python;
- ``grape_next_line_<stem>``: the same task over any held-out text file given by path (for a
  model trained on other text, e.g. the shared models' ``eval_code.txt`` gives
  ``grape_next_line_eval_code``).

The data is built at run time rather than shipped, from a fixed seed, so the repository holds
no copy of anyone's text and the items follow the text the model is evaluated on. The
``datasets`` cache lives in the same temporary directory, so evaluation leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from grape.data import load_texts
from grape.tasks.next_line import NextLineSpec, next_line_items

__all__ = ["STDLIB_TASK", "TEXT_TASK_PREFIX", "TASK_VERSION", "text_task_name", "write_task", "local_task_dir"]

STDLIB_TASK = "grape_stdlib_next_line"
TEXT_TASK_PREFIX = "grape_next_line_"
TASK_VERSION = 1.0
"""Bumped whenever item construction changes, so results of different versions are not mixed."""


def text_task_name(path: str | os.PathLike[str]) -> str:
    """``grape_next_line_<stem>`` for a text file, the stem lower-cased to [a-z0-9_]."""
    stem = re.sub(r"[^a-z0-9_]+", "_", Path(path).stem.lower()).strip("_")
    if not stem:
        raise ValueError(f"cannot name a task after {path!r}: its file name has no letters or digits")
    return TEXT_TASK_PREFIX + stem


def write_task(directory: Path, name: str, items: list[dict], *, cache_dir: Path) -> Path:
    """Write ``name.jsonl`` (the items) and ``name.yaml`` (its lm-eval definition); the YAML path.

    The definition is written as JSON, which is valid YAML, so no YAML writer is needed. The
    context is the prompt as is and a choice follows it directly (``target_delimiter: ""``): the
    context already ends where the next line starts. ``acc_norm`` divides by the choice's byte
    length, which matters here because candidate lines differ in length.
    """
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    definition = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": TASK_VERSION},
    }
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(definition, indent=2) + "\n", encoding="utf-8")
    return path


def _stdlib_documents() -> list[str]:
    from grape.demo.corpus import split_sources, stdlib_sources

    _, held_out = split_sources(stdlib_sources())
    return [f.read_text(encoding="utf-8", errors="replace") for f in held_out]


@contextlib.contextmanager
def local_task_dir(
    tasks: Sequence[str], texts: Sequence[str | os.PathLike[str]] = (), *, spec: NextLineSpec | None = None, seed: int = 0
) -> Iterator[tuple[Path, list[str]]]:
    """A temporary folder with the grape tasks among ``tasks`` and one task per file in ``texts``.

    Yields the folder (for ``TaskManager(include_path=...)``) and the names of the tasks written.
    A text task is written whether or not it is requested, so the caller can list it; the
    stdlib task only when requested (it reads the standard library).

    Raises:
        ValueError: two text files that give the same task name, or text with no usable line.
        CalibrationDataError: a text file that is missing or empty.
    """
    sources: dict[str, list[str]] = {}
    for path in texts:
        name = text_task_name(path)
        if name in sources:
            raise ValueError(f"two task texts give the same task name {name!r}; rename one of the files")
        sources[name] = load_texts(path)
    if STDLIB_TASK in tasks:
        sources[STDLIB_TASK] = _stdlib_documents()
    with tempfile.TemporaryDirectory(prefix="grape-tasks-") as tmp:
        folder = Path(tmp) / "tasks"
        folder.mkdir()
        for name, documents in sources.items():
            write_task(folder, name, next_line_items(documents, spec, seed=seed), cache_dir=Path(tmp) / "datasets")
        yield folder, sorted(sources)
