"""Report artefacts: the per-layer expert-count plot, atomic JSON files, markdown tables.

Every file is written atomically (:mod:`grape.files`): a report or plot is either the old
complete file or the new complete file, never a truncated one left by an interrupted run.

The plot uses matplotlib's object API with the Agg canvas directly instead of ``pyplot``, so it
neither needs a display nor changes the caller's global matplotlib backend.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from numbers import Number
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from grape.errors import InputError
from grape.files import write_atomic, write_text_atomic
from grape.output_guard import REPORT_FILE

__all__ = [
    "VOLATILE_KEYS",
    "PLOT_FILE",
    "write_report",
    "previous_report",
    "plot_experts_per_layer",
    "write_json_atomic",
    "format_table",
]

PLOT_FILE = "experts_per_layer.png"

VOLATILE_KEYS = ("timings_s", "resumed_from_step")
"""Report keys that describe how this run went rather than the checkpoint it wrote. Everything
else in a report, and every other file of a checkpoint, is a deterministic function of the
inputs and options: a resumed or repeated run writes the same bytes."""


def _check_counts(name: str, counts: Sequence[int | None]) -> None:
    for index, value in enumerate(counts):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise ValueError(
                f"{name}[{index}] must be None (dense layer) or an integer >= 0, got {value!r}"
            )


def plot_experts_per_layer(
    counts_before: Sequence[int | None],
    counts_after: Sequence[int | None],
    path: str | os.PathLike[str],
    title: str,
) -> Path:
    """Write a PNG bar chart of routed experts per decoder layer, before and after pruning.

    One entry per decoder layer; ``None`` marks a dense layer (no routed experts), drawn as a
    gap labelled "dense" so layer indices on the x axis stay the real decoder indices.

    Raises:
        ValueError: the lists differ in length or are empty, a count is not a non-negative
            integer, or a layer is dense in one list and not in the other.
    """
    before, after = list(counts_before), list(counts_after)
    if not before or len(before) != len(after):
        raise ValueError(
            f"need one count per decoder layer in both lists, got {len(before)} and {len(after)}"
        )
    _check_counts("counts_before", before)
    _check_counts("counts_after", after)
    mismatched = [i for i, (b, a) in enumerate(zip(before, after)) if (b is None) != (a is None)]
    if mismatched:
        raise ValueError(f"layers {mismatched} are dense (None) in one list but not in the other")

    layers = np.arange(len(before))
    moe = [i for i, b in enumerate(before) if b is not None]
    width = 0.4
    figure = Figure(figsize=(max(6.0, 0.35 * len(before) + 2.0), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    before_moe, after_moe = [before[i] for i in moe], [after[i] for i in moe]
    axes.bar(layers[moe] - width / 2, before_moe, width, label="before", color="#9aa5b1")
    axes.bar(layers[moe] + width / 2, after_moe, width, label="after", color="#2f7ebc")
    for i, value in enumerate(before):
        if value is None:
            axes.text(
                i, 0, "dense", rotation=90, ha="center", va="bottom", fontsize=7, color="#666"
            )
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("routed experts")
    axes.set_title(title)
    axes.set_xlim(-0.6, len(before) - 0.4)
    axes.set_xticks(layers if len(before) <= 32 else layers[:: max(1, len(before) // 16)])
    axes.yaxis.get_major_locator().set_params(integer=True)
    # Headroom above the tallest bar keeps the legend from covering any layer's bars.
    axes.set_ylim(0, max([*before_moe, *after_moe, 1]) * 1.25)
    axes.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def write_report(directory: Path, report: dict[str, Any], *, plot_title: str) -> dict[str, Any]:
    """Write a checkpoint's plot and ``grape_report.json`` into ``directory``; returns the report.

    The report is assembled by the caller and written once, last, so it can list every file
    of the checkpoint (``"files"``): that list is how ``--overwrite`` later recognises the
    directory as a grape output holding nothing of the user's.
    """
    plot_experts_per_layer(report["experts_per_layer_before"], report["experts_per_layer"], directory / PLOT_FILE, plot_title)
    report = {**report, "files": sorted({p.name for p in directory.iterdir()} | {REPORT_FILE})}
    write_json_atomic(report, directory / REPORT_FILE)
    return json.loads(json.dumps(report, default=_json_default))


def previous_report(model_dir: Path) -> dict[str, Any] | None:
    """The input's own grape report (e.g. of ``grape prune``), so an output records every step."""
    path = model_dir / REPORT_FILE
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}; remove it if it does not belong to this model") from exc
    if not isinstance(report, dict):
        raise InputError(f"{path} is not a grape report")
    return report


def _json_default(value: Any) -> Any:
    """Serialise the non-JSON types reports naturally contain (tensors, numpy values, paths)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")


def write_json_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file + ``os.replace``).

    Tensors and numpy values become (nested) lists or numbers and paths become strings, so a
    report can hold scores as they come out of a criterion. The content is serialised before
    the file is created, so an unserialisable object leaves no file behind at all.
    """
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = format(value, floatfmt)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _is_numeric_column(values: Sequence[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, Number) and not isinstance(v, bool) for v in present)


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, floatfmt: str = ".4g"
) -> str:
    """A markdown table of ``rows`` restricted to ``columns`` (in that order).

    Missing keys and ``None`` render as empty cells (e.g. a dense layer has no expert count);
    floats use ``floatfmt``; columns whose values are all numbers are right-aligned. Cells are
    padded so the table is also readable as plain text in a terminal.

    Raises:
        ValueError: no columns, or a column that appears in none of the rows (a typo would
            otherwise silently print an empty column).
    """
    columns = list(columns)
    if not columns:
        raise ValueError("format_table needs at least one column")
    absent = [c for c in columns if rows and not any(c in row for row in rows)]
    if absent:
        raise ValueError(f"columns {absent} appear in none of the rows")
    cells = [[_cell(row.get(c), floatfmt) for c in columns] for row in rows]
    numeric = [_is_numeric_column([row.get(c) for row in rows]) for c in columns]
    widths = [max([len(c), 3] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rules = ["-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric)]
    rule = "| " + " | ".join(rules) + " |"
    return "\n".join([line(columns), rule] + [line(r) for r in cells])
