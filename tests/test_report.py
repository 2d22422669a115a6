"""Tests of grape.report: the expert-count plot, atomic JSON writing, markdown tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

from grape.report import format_table, plot_experts_per_layer, write_json_atomic


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_plot_writes_png_with_dense_gaps(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "experts.png"
    result = plot_experts_per_layer([None, 8, 8, 8], [None, 6, 4, 7], path, "test model")
    assert result == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert _leftovers(path.parent, {"experts.png"}) == []


def test_plot_draws_one_bar_pair_per_moe_layer(tmp_path: Path, monkeypatch) -> None:
    """Dense layers are gaps: bars exist only at MoE layer positions, with the given heights."""
    drawn = []
    original_savefig = Figure.savefig

    def capture(self, *args, **kwargs):
        axes = self.axes[0]
        drawn.extend((round(p.get_x() + p.get_width() / 2, 6), p.get_height()) for p in axes.patches)
        return original_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    plot_experts_per_layer([None, 8, 8], [None, 5, 3], tmp_path / "p.png", "t")
    assert sorted(drawn) == [(0.8, 8), (1.2, 5), (1.8, 8), (2.2, 3)]


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        ([8, 8], [8], "one count per decoder layer"),
        ([], [], "one count per decoder layer"),
        ([8, None], [8, 4], "dense"),
        ([8, -1], [8, 4], "integer >= 0"),
        ([8, 2.5], [8, 4], "integer >= 0"),
    ],
)
def test_plot_rejects_bad_counts(tmp_path: Path, before, after, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plot_experts_per_layer(before, after, tmp_path / "p.png", "t")
    assert not (tmp_path / "p.png").exists()


def test_plot_failure_keeps_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "p.png"
    path.write_bytes(b"previous")

    def fail(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_experts_per_layer([4], [2], path, "t")
    assert path.read_bytes() == b"previous"
    assert _leftovers(tmp_path, {"p.png"}) == []


def test_write_json_atomic_round_trip_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "report.json"
    path.parent.mkdir()
    path.write_text("old")
    report = {
        "scores": torch.tensor([[1.5, 2.0], [3.0, 4.25]]),
        "count": np.int64(7),
        "ratio": np.float32(0.5),
        "kept": np.array([0, 2, 3]),
        "path": tmp_path / "x",
        "nested": {"layers": [None, 3]},
    }
    write_json_atomic(report, path)
    assert json.loads(path.read_text()) == {
        "scores": [[1.5, 2.0], [3.0, 4.25]],
        "count": 7,
        "ratio": 0.5,
        "kept": [0, 2, 3],
        "path": str(tmp_path / "x"),
        "nested": {"layers": [None, 3]},
    }
    assert _leftovers(path.parent, {"report.json"}) == []


def test_write_json_atomic_unserialisable_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text('{"old": true}')
    with pytest.raises(TypeError, match="object"):
        write_json_atomic({"bad": object()}, path)
    assert json.loads(path.read_text()) == {"old": True}
    assert _leftovers(tmp_path, {"report.json"}) == []


def test_format_table_exact_output() -> None:
    rows = [
        {"method": "grape", "ppl": 12.3456789, "experts": 48},
        {"method": "a|b", "ppl": None, "experts": 56, "ignored": 1},
        {"method": "frequency", "experts": 40},
    ]
    assert format_table(rows, ["method", "ppl", "experts"]) == (
        "| method    |   ppl | experts |\n"
        "| --------- | ----: | ------: |\n"
        "| grape     | 12.35 |      48 |\n"
        "| a\\|b      |       |      56 |\n"
        "| frequency |       |      40 |"
    )


def test_format_table_float_format_and_errors() -> None:
    assert format_table([{"x": 0.123456}], ["x"], floatfmt=".2f").splitlines()[-1] == "| 0.12 |"
    assert format_table([], ["a", "b"]) == "| a   | b   |\n| --- | --- |"
    with pytest.raises(ValueError, match=r"\['typo'\]"):
        format_table([{"a": 1}], ["a", "typo"])
    with pytest.raises(ValueError, match="at least one column"):
        format_table([{"a": 1}], [])
