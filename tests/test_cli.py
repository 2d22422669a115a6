"""The command line's safety contract, one test per defect of issue 7: nothing outside --out is
touched, caches are data, every error is one line with exit code 2 (tracebacks only with --debug).

These tests only drive ``grape.cli.main`` (or ``python -m grape.cli``) and look at files and
stderr, so they state the contract independently of how grape implements it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import build_tiny_model, write_calibration_text

from grape.cli import main

ROOT = Path(__file__).resolve().parents[1]
PRUNE = ["--method", "frequency", "--experts-ratio", "0.25", "--calib-samples", "4", "--seq-len", "32"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    build_tiny_model("mixtral", root / "model")
    write_calibration_text(root / "calib.txt")
    return root


def _copy_model(base: Path, dst: Path) -> Path:
    shutil.copytree(base / "model", dst)
    return dst


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if f"grape {command}: error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ---- 1: data loss -------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["prune", "sparsify", "distill"])
def test_out_holding_an_input_is_refused_even_with_overwrite(command, base, tmp_path, capsys):
    parent = tmp_path / "parent"
    model = _copy_model(base, parent / "model")
    (parent / "notes.txt").write_text("my notes")
    before = _files(tmp_path)
    if command == "prune":
        args = ["prune", str(model), "--calib", str(base / "calib.txt"), *PRUNE]
    elif command == "sparsify":
        args = ["sparsify", str(model), "--method", "magnitude", "--sparsity", "0.5"]
    else:  # through the teacher
        args = ["distill", str(base / "model"), "--teacher", str(model), "--data", str(base / "calib.txt"),
                "--steps", "1", "--batch-size", "1", "--seq-len", "16"]  # fmt: skip
    assert main([*args, "--out", str(parent), "--overwrite"]) == 2
    assert "contains the" in _one_error_line(capsys, command)
    assert _files(tmp_path) == before


def test_overwrite_never_deletes_a_folder_grape_did_not_write(base, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    code = main(["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE, "--out", str(notes), "--overwrite"])
    assert code == 2 and "not a grape output" in _one_error_line(capsys, "prune")
    assert (notes / "thesis.txt").read_text() == "years of work"


# ---- 2: code execution --------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_poisoned_cache_is_never_executed(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRAPE_CACHE", str(tmp_path / "cache"))
    args = ["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE]
    assert main([*args, "--out", str(tmp_path / "first")]) == 0
    marker = tmp_path / "PWNED"
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cached
    for path in cached:
        path.write_bytes(pickle.dumps(_Payload(str(marker))))
    assert main([*args, "--out", str(tmp_path / "second")]) == 0
    assert not marker.exists()
    assert "grape: warning: ignoring cache file" in capsys.readouterr().err
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("first", "second")]
    assert weights[0] == weights[1]


# ---- 3: tracebacks instead of errors ------------------------------------------------------


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_invalid_config_json_is_one_line(command, base, tmp_path, capsys):
    model = _copy_model(base, tmp_path / "model")
    (model / "config.json").write_text("{not json")
    if command == "prune":
        code = main(["prune", str(model), "--calib", str(base / "calib.txt"), *PRUNE, "--out", str(tmp_path / "o")])
    else:
        code = main(["eval", str(model), "--ppl", str(base / "calib.txt"), "--seq-len", "32"])
    assert code == 2 and "config.json" in _one_error_line(capsys, command)


@pytest.mark.parametrize(("device", "why"), [("foo", "unknown device 'foo'"), ("cuda:7", "--device cuda:7")])
def test_an_unusable_device_is_one_line(device, why, base, tmp_path, capsys):
    if device.startswith("cuda"):
        pytest.importorskip("torch")
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    code = main(["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE, "--device", device, "--out", str(tmp_path / "o")])
    assert code == 2 and why in _one_error_line(capsys, "prune")
    assert not (tmp_path / "o").exists()


def test_a_truncated_cache_file_is_recomputed(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRAPE_CACHE", str(tmp_path / "cache"))
    args = ["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE]
    assert main([*args, "--out", str(tmp_path / "first")]) == 0
    for path in (p for p in (tmp_path / "cache").rglob("*") if p.is_file()):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main([*args, "--out", str(tmp_path / "second")]) == 0
    assert "ignoring cache file" in capsys.readouterr().err
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("first", "second")]
    assert weights[0] == weights[1]


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(base, tmp_path, monkeypatch, capsys):
    import grape.shards

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(grape.shards.ShardWriter, "_open_shard", full)
    out = tmp_path / "out"
    assert main(["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE, "--out", str(out)]) == 2
    assert "the disk is full" in _one_error_line(capsys, "prune")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_output_location_is_refused_before_calibration(base, tmp_path, monkeypatch, capsys):
    import grape.calibration.collect as collect

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started")

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(collect, "run_layerwise", no_calibration)
    monkeypatch.setattr(os, "open", read_only)
    code = main(["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE, "--out", str(tmp_path / "out")])
    assert code == 2 and "read-only" in _one_error_line(capsys, "prune")


@pytest.mark.parametrize(
    ("counts", "why"),
    [([7, 6], "layer 0 should have 7 routed experts"), ([6, "six"], "must list one positive count"), ([6], "per decoder layer")],
)
def test_eval_on_corrupt_per_layer_counts_is_one_line(counts, why, base, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    config["grape_experts_per_layer"] = counts
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["eval", str(out), "--ppl", str(base / "calib.txt"), "--seq-len", "32"]) == 2
    assert why in _one_error_line(capsys, "eval")
    assert main(["info", str(out)]) == 2
    assert why in _one_error_line(capsys, "info")


def test_debug_shows_the_traceback(base, tmp_path, monkeypatch):
    model = _copy_model(base, tmp_path / "model")
    (model / "config.json").write_text("{not json")
    args = ["eval", str(model), "--ppl", str(base / "calib.txt"), "--seq-len", "32"]
    with pytest.raises(ValueError, match="config.json"):
        main([*args, "--debug"])
    monkeypatch.setenv("GRAPE_DEBUG", "1")
    with pytest.raises(ValueError, match="config.json"):
        main(args)


# ---- 4: killed instead of refused ---------------------------------------------------------


@pytest.mark.parametrize("command", ["prune", "sparsify", "distill", "eval"])
def test_seq_len_beyond_the_models_positions_is_refused(command, base, tmp_path, capsys):
    calib, out = str(base / "calib.txt"), str(tmp_path / "o")
    args = {
        "prune": ["prune", str(base / "model"), "--calib", calib, *PRUNE[:-2], "--out", out],
        "sparsify": ["sparsify", str(base / "model"), "--sparsity", "0.5", "--calib", calib, "--out", out],
        "distill": ["distill", str(base / "model"), "--teacher", str(base / "model"), "--data", calib, "--out", out],
        "eval": ["eval", str(base / "model"), "--ppl", calib],
    }[command]
    assert main([*args, "--seq-len", "100000"]) == 2
    assert "exceeds the model's max_position_embeddings (128)" in _one_error_line(capsys, command)
    assert not (tmp_path / "o").exists()


# ---- 5: garbage left behind ---------------------------------------------------------------


def _grape(args: list[str], env: dict, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "grape.cli", *args], env=env, stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigterm_while_writing_leaves_nothing(base, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRAPE_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out"
    proc = _grape(["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE, "--out", str(out)], env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob(".out.grape-tmp-*")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    assert code in (0, 143), proc.stderr.read()  # too late to stop (0) or stopped cleanly (143)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_overwrite_onto_a_regular_file_is_refused(base, tmp_path, capsys):
    (tmp_path / "x").write_text("a file")
    code = main(["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE, "--out", str(tmp_path / "x"), "--overwrite"])
    assert code == 2 and "not a directory" in _one_error_line(capsys, "prune")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"] and (tmp_path / "x").read_text() == "a file"


# ---- 6: races -----------------------------------------------------------------------------


def test_two_runs_sharing_a_cache_both_succeed_with_identical_results(base, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRAPE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    args = ["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE, "--sample-tokens", "64"]
    procs = [_grape([*args, "--out", str(tmp_path / f"o{i}")], env) for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert (tmp_path / "o0" / "model.safetensors").read_bytes() == (tmp_path / "o1" / "model.safetensors").read_bytes()


def test_a_run_on_an_output_another_run_is_writing_is_refused(base, tmp_path, capsys):
    from grape.output_guard import claim_output

    out = tmp_path / "out"
    with claim_output(out, inputs={}, overwrite=False):  # another run holds it
        code = main(["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE, "--out", str(out)])
    assert code == 2 and "another grape run" in _one_error_line(capsys, "prune")


# ---- 7: smaller ---------------------------------------------------------------------------


def test_a_budget_that_removes_nothing_is_refused(base, tmp_path, capsys):
    code = main(["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE[:2], "--experts-ratio", "0.01",
                 *PRUNE[4:], "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "removes no expert" in _one_error_line(capsys, "prune")
    assert main(["prune", str(base / "model"), "--calib", str(base / "calib.txt"), "--method", "frequency", "--keep-experts", "8",
                 *PRUNE[4:], "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "removes none" in _one_error_line(capsys, "prune")


def test_nan_perplexity_is_an_error(base, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = _copy_model(base, tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"][:] = float("nan")
    save_file(tensors, model / "model.safetensors", {"format": "pt"})
    assert main(["eval", str(model), "--ppl", str(base / "calib.txt"), "--seq-len", "32"]) == 2
    assert "perplexity on" in _one_error_line(capsys, "eval")


def test_a_missing_tokenizer_says_so(base, tmp_path, capsys):
    model = _copy_model(base, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    assert main(["prune", str(model), "--calib", str(base / "calib.txt"), *PRUNE, "--out", str(tmp_path / "o")]) == 2
    assert f"no tokenizer files in {model}" in _one_error_line(capsys, "prune")


def test_invalid_utf8_in_jsonl_names_the_file(base, tmp_path, capsys):
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    assert main(["prune", str(base / "model"), "--calib", str(bad), *PRUNE, "--out", str(tmp_path / "o")]) == 2
    assert f"{bad} is not valid UTF-8" in _one_error_line(capsys, "prune")


def test_outputs_follow_the_umask(base, tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(["prune", str(base / "model"), "--calib", str(base / "calib.txt"), *PRUNE, "--out", str(tmp_path / "o")]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755
