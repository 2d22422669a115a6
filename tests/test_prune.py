"""``grape prune`` end to end on tiny models: every method, determinism, bad input, interruption."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny_model, write_calibration_text

from grape.cli import main

ALL_METHODS = ["random", "frequency", "soft_activation", "ean", "reap", "naee", "global_soft_activation", "grape"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("mixtral", tmp_path_factory.mktemp("mixtral") / "model")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def _prune(model_dir, calib, out, *extra):
    return main(
        ["prune", str(model_dir), "--calib", str(calib), "--calib-samples", "8", "--seq-len", "32", "--out", str(out), *extra]
    )


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_meets_the_budget(method, model_dir, calib, tmp_path):
    assert _prune(model_dir, calib, tmp_path / "out", "--method", method, "--experts-ratio", "0.25") == 0
    report = json.loads((tmp_path / "out" / "grape_report.json").read_text())
    assert sum(report["experts_per_layer"]) == 16 - 4  # 25% of 2 x 8 experts removed in total
    assert all(c >= 2 for c in report["experts_per_layer"])  # never below top_k
    if method not in ("grape", "global_soft_activation"):
        assert report["experts_per_layer"] == [6, 6]
    assert report["parameters_after"] < report["parameters_before"]
    assert set(report["timings_s"]) >= {"calibration", "total"}
    assert report["kept_experts"]["0"] == sorted(report["kept_experts"]["0"])


def test_merge_mode_and_keep_experts(model_dir, calib, tmp_path):
    assert _prune(model_dir, calib, tmp_path / "m", "--method", "grape", "--keep-experts", "5", "--merge") == 0
    report = json.loads((tmp_path / "m" / "grape_report.json").read_text())
    assert sum(report["experts_per_layer"]) == 10
    assert report["merged_into"]


def test_same_seed_same_plan(model_dir, calib, tmp_path):
    plans = []
    for i, seed in enumerate(["3", "3", "4"]):
        _prune(model_dir, calib, tmp_path / f"r{i}", "--method", "random", "--experts-ratio", "0.5", "--seed", seed)
        plans.append(json.loads((tmp_path / f"r{i}" / "grape_report.json").read_text())["kept_experts"])
    assert plans[0] == plans[1]


def test_sequential_mode(model_dir, calib, tmp_path):
    assert _prune(model_dir, calib, tmp_path / "s", "--method", "reap", "--experts-ratio", "0.25", "--sequential") == 0
    report = json.loads((tmp_path / "s" / "grape_report.json").read_text())
    assert report["experts_per_layer"] == [6, 6] and report["calibration"]["sequential"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "frequency", "--experts-ratio", "1.5"], "must be in (0, 1)"),
        (["--method", "frequency", "--keep-experts", "1"], "must keep at least 2"),
        (["--method", "grape", "--experts-ratio", "0.95"], "at most 12"),
        (["--method", "nope", "--experts-ratio", "0.5"], "invalid choice"),
    ],
)
def test_bad_budget_or_method_fails_fast(args, message, model_dir, calib, tmp_path, capsys):
    with pytest.raises(SystemExit) if "invalid choice" in message or "(0, 1)" in message else _no_raise():
        code = _prune(model_dir, calib, tmp_path / "o", *args)
        assert code == 2
    assert not (tmp_path / "o").exists()
    assert message in capsys.readouterr().err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_missing_and_short_calibration_data(model_dir, tmp_path, capsys):
    assert _prune(model_dir, tmp_path / "missing.txt", tmp_path / "o", "--method", "frequency", "--experts-ratio", "0.5") == 2
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    assert _prune(model_dir, short, tmp_path / "o", "--method", "frequency", "--experts-ratio", "0.5") == 2
    err = capsys.readouterr().err
    assert "no such file" in err
    assert "tokens" in err
    assert not (tmp_path / "o").exists()


def test_not_an_moe_model(tmp_path, calib, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)).save_pretrained(tmp_path / "llama")
    assert _prune(tmp_path / "llama", calib, tmp_path / "o", "--method", "frequency", "--experts-ratio", "0.5") == 2
    assert "Supported: Mixtral" in capsys.readouterr().err


def test_existing_output_dir_refused(model_dir, calib, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    assert _prune(model_dir, calib, tmp_path / "o", "--method", "frequency", "--experts-ratio", "0.5") == 2
    assert "--overwrite" in capsys.readouterr().err


def test_nan_during_calibration_names_the_layer(model_dir, calib, tmp_path, capsys):
    import shutil

    bad = tmp_path / "nan"
    shutil.copytree(model_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    key = next(k for k in tensors if "layers.1" in k and "q_proj" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", {"format": "pt"})
    assert _prune(bad, calib, tmp_path / "o", "--method", "frequency", "--experts-ratio", "0.5", "--no-cache") == 2
    assert "layer 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_interrupted_run_leaves_nothing_and_rerun_succeeds(model_dir, calib, tmp_path):
    """SIGINT mid-calibration: no output dir, input unchanged, and a re-run completes."""
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    out = tmp_path / "out"
    env = dict(os.environ, GRAPE_CACHE=str(tmp_path / "cache"))
    # enough calibration work that layer 1 takes a while after layer 0's statistics land on disk
    cmd = [sys.executable, "-m", "grape.cli", "prune", str(model_dir), "--method", "grape", "--experts-ratio", "0.25",
           "--calib", str(calib), "--calib-samples", "120", "--seq-len", "32", "--sample-tokens", "3000",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    cache = tmp_path / "cache" / "stats"
    while time.time() < deadline and not list(cache.glob("*/layer_0000.safetensors")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    assert not out.exists() and not list(tmp_path.glob(".out.grape-*"))
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "config.json").is_file()


def test_working_dtype_does_not_change_the_stored_dtype(tmp_path, calib):
    src = build_tiny_model("mixtral", tmp_path / "bf16", dtype=torch.bfloat16)
    assert _prune(src, calib, tmp_path / "o", "--method", "reap", "--experts-ratio", "0.25", "--dtype", "float32") == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "o" / "model.safetensors").values() if t.is_floating_point())
