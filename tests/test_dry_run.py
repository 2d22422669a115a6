"""The dry run: planned from config.json (and headers), writes nothing; a run that cannot fit is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from grape.checkpoint_files import read_header
from grape.cli import main
from tests.tiny_models import build_tiny_model, write_calibration_text

PRUNE = ["--method", "frequency", "--experts-ratio", "0.25", "--calib-samples", "4", "--seq-len", "16"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_model("mixtral", tmp_path_factory.mktemp("dry") / "model", num_hidden_layers=3)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _plan(args: list[str], capsys) -> dict:
    assert main([*args, "--dry-run", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_config_only_directory_is_planned_like_the_full_checkpoint(model, tmp_path, capsys):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(model / "config.json", config_only / "config.json")
    planned = _plan(["prune", str(config_only), *PRUNE], capsys)
    headers = _plan(["prune", str(model), *PRUNE], capsys)
    assert planned["weights_from"] == "config.json only" and headers["weights_from"] == "safetensors headers"
    for key in ("peak_rss_bytes", "output_bytes", "calibration_flops"):
        assert isinstance(planned[key], int) and planned[key] > 0
    assert [entry["layer"] for entry in planned["layers"]] == [0, 1, 2]
    assert all(entry["experts"] == 8 and entry["experts_kept"] == 6 for entry in planned["layers"])
    # the float32 sizes the config declares are the header's sizes
    assert [e["stored_bytes"] for e in planned["layers"]] == [e["stored_bytes"] for e in headers["layers"]]
    assert planned["calibration_flops"] == headers["calibration_flops"]


def test_predicted_output_bytes_match_the_written_checkpoint(model, tmp_path, capsys):
    calib = write_calibration_text(tmp_path / "calib.txt")
    args = ["prune", str(model), *PRUNE, "--calib", str(calib)]
    planned = _plan(args, capsys)
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    written = sum(e.nbytes for p in (tmp_path / "out").glob("*.safetensors") for e in read_header(p))
    # the plan counts routers as copied (they lose the removed experts' rows: 0.2 % here)
    assert 0 <= planned["output_bytes"] - written < 0.01 * written
    assert planned["output_bytes"] < planned["source_bytes"]


def test_calibration_flops_grow_with_the_calibration_tokens(model, capsys):
    short = _plan(["sparsify", str(model), "--sparsity", "0.5", "--calib-samples", "4", "--seq-len", "16"], capsys)
    long = _plan(["sparsify", str(model), "--sparsity", "0.5", "--calib-samples", "8", "--seq-len", "16"], capsys)
    assert long["calibration_flops"] == pytest.approx(2 * short["calibration_flops"], rel=0.01)
    magnitude = _plan(["sparsify", str(model), "--sparsity", "0.5", "--method", "magnitude"], capsys)
    assert magnitude["calibration_flops"] == 0


def test_the_dry_run_writes_nothing_anywhere(model, tmp_path, capsys, monkeypatch):
    cache = Path(os.environ["GRAPE_CACHE"])
    before_model, before_cache = _snapshot(model), _snapshot(cache) if cache.exists() else None
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    for command in (["prune", str(model), *PRUNE], ["sparsify", str(model), "--sparsity", "0.5"]):
        assert main([*command, "--out", str(out), "--dry-run"]) == 0
        text = capsys.readouterr().out
        assert "predicted peak RSS" in text and "calibration:" in text
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert _snapshot(model) == before_model
    assert (_snapshot(cache) if cache.exists() else None) == before_cache


@pytest.mark.parametrize("command", ["prune", "sparsify"])
def test_a_run_that_cannot_fit_is_refused_in_one_line_before_writing(command, model, tmp_path, capsys):
    calib = write_calibration_text(tmp_path / "calib.txt")
    flags = PRUNE if command == "prune" else ["--sparsity", "0.5", "--calib-samples", "4", "--seq-len", "16"]
    out = tmp_path / "out"
    assert main([command, str(model), *flags, "--calib", str(calib), "--out", str(out), "--max-memory", "1MB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "would need about" in err and "more than --max-memory 1 MB" in err
    assert "it would fit with --max-memory" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [calib]


def test_the_refusal_names_a_calibration_setting_that_fits(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("grape.dry_run.resident_bytes", lambda: 300 * 2**20)  # the interpreter, held still
    big = ["prune", str(model), "--method", "frequency", "--experts-ratio", "0.25", "--calib-samples", "64", "--seq-len", "128"]
    planned = _plan(big, capsys)
    activations = 64 * 128 * 32 * 4
    budget = planned["peak_rss_bytes"] - activations  # fits with about half the samples, not with all
    calib = write_calibration_text(tmp_path / "calib.txt", repeats=400)
    code = main([*big, "--calib", str(calib), "--out", str(tmp_path / "out"), "--max-memory", str(budget)])
    err = capsys.readouterr().err
    assert code == 2 and "--calib-samples" in err and "--seq-len" in err and "--max-memory" in err
    samples = int(err.split("--calib-samples ")[1].split()[0])
    assert 1 <= samples < 64
    smaller = _plan([*big[:-4], "--calib-samples", str(samples), "--seq-len", "128"], capsys)
    larger = _plan([*big[:-4], "--calib-samples", str(samples + 1), "--seq-len", "128"], capsys)
    assert smaller["peak_rss_bytes"] <= budget < larger["peak_rss_bytes"]


def test_expert_groups_are_the_largest_that_fit():
    from grape.memory_model import LayerShape, Workload, calibration_bytes, experts_per_group

    layer = LayerShape(
        index=3, working_bytes=256 * 88_000_000 + 400_000_000, stored_bytes=0, experts=256, expert_working_bytes=88_000_000,
        expert_stored_bytes=44_000_000, largest_stored_bytes=44_000_000, dense_params=200_000_000,
        expert_params=44_000_000, top_k=8, intermediate=2048,
    )  # fmt: skip
    work = Workload(command="prune", samples=64, seq_len=512, batch_size=8, hidden=7168, heads=128, head_dim=128, itemsize=2, sample_tokens=512)
    sizes = [calibration_bytes(layer, work, group=g) for g in range(1, 257)]
    assert sizes == sorted(sizes) and sizes[-1] == calibration_bytes(layer, work)
    for available in (sizes[0] - 1, sizes[0], sizes[40] + 1, sizes[-1], 10**15):
        group = experts_per_group(layer, work, available)
        assert (group == 0) == (available < sizes[0])
        if group:
            assert sizes[group - 1] <= available and (group == 256 or sizes[group] > available)
