"""``grape demo`` end to end, and what it takes from a model given with --model."""

import json
from pathlib import Path

import pytest

from grape.demo import _external_model, run_demo
from grape.demo.model import QUICK_RECIPE


def test_demo_rejects_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        run_demo(tmp_path / "work", quick=True, model=str(tmp_path))


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    results = run_demo(tmp_path, quick=True)

    table = (tmp_path / "results.md").read_text()
    labels = [row["model"] for row in results["summary"]]
    assert labels[0] == "original" and len(labels) == 7
    for pct in ("25%", "50%"):
        assert f"grape @{pct}" in labels and f"global_soft_activation @{pct}" in labels
        assert sum(label.endswith(f"@{pct} (best uniform)") for label in labels) == 1
    assert all(label in table for label in labels)
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]

    original = results["original"]
    assert len(results["pruned"]) == 12  # 6 methods x 2 budgets
    for name, result in results["pruned"].items():
        assert result["parameters"] < original["parameters"], name
        assert result["file_bytes"] < original["file_bytes"], name
        assert result["experts"] == original["experts"] * (0.75 if name.endswith("@0.25") else 0.5)
        assert all(ppl > 1 for ppl in result["perplexity"].values())
        assert Path(result["path"], "grape_report.json").is_file()
    assert json.loads((tmp_path / "model" / "training.json").read_text())["steps"] == QUICK_RECIPE.steps


def test_a_given_model_brings_its_own_data_or_gets_the_stdlib_split(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calib, eval_sets, training = _external_model(model, tmp_path / "work")
    assert calib == tmp_path / "work" / "calib.txt" and calib.is_file()
    assert eval_sets == {"eval": tmp_path / "work" / "eval.txt"} and training is None

    (model / "calib.txt").write_text("calibration text")
    (model / "eval_code.txt").write_text("held-out code")
    (model / "training.json").write_text('{"seq": 256}')
    calib, eval_sets, training = _external_model(model, tmp_path / "other")
    assert (calib, eval_sets, training) == (model / "calib.txt", {"code": model / "eval_code.txt"}, {"seq": 256})
    assert not (tmp_path / "other").exists()  # nothing to fall back on, nothing written
