"""The safety property of every writing command, through each of its failure modes.

For prune, sparsify and distill: bad input, SIGINT and SIGKILL during calibration and during
the checkpoint write. Afterwards every file outside ``--out`` and the statistics cache is
byte-identical to before (grape's own siblings of ``--out`` aside: a SIGKILL cannot be cleaned
up after, and an interrupted distillation keeps its resumable state), and a re-run succeeds,
leaves nothing beside ``--out``, and writes the same checkpoint as an uninterrupted run: the
same bytes in every file, the report equal but for its volatile keys (timings).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_injection import patches
from tiny_models import build_tiny_model, write_calibration_text

from grape.cli import main
from grape.report import VOLATILE_KEYS

TESTS = Path(__file__).resolve().parent
COMMANDS = {
    "prune": lambda r: ["prune", str(r / "inputs" / "model"), "--method", "reap", "--experts-ratio", "0.25",
                        "--calib", str(r / "inputs" / "calib.txt"), "--calib-samples", "2", "--seq-len", "16"],
    "sparsify": lambda r: ["sparsify", str(r / "inputs" / "model"), "--sparsity", "0.5",
                           "--calib", str(r / "inputs" / "calib.txt"), "--calib-samples", "2", "--seq-len", "16"],
    "distill": lambda r: ["distill", str(r / "inputs" / "student"), "--teacher", str(r / "inputs" / "model"),
                          "--data", str(r / "inputs" / "calib.txt"), "--steps", "2", "--batch-size", "1",
                          "--seq-len", "16", "--checkpoint-every", "1"],
}  # fmt: skip
BAD_INPUT = {  # each refused only after the model was opened
    "prune": ["--calib-samples", "100000"],
    "sparsify": ["--pattern", "1:7"],
    "distill": ["--data", "missing.txt"],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    model = build_tiny_model("mixtral", root / "inputs" / "model")
    write_calibration_text(root / "inputs" / "calib.txt")
    student = build_tiny_model("mixtral", root / "inputs" / "student", seed=1)
    (root / "inputs" / "notes.txt").write_text("the user's notes beside the models")
    assert model.is_dir() and student.is_dir()
    return root


@pytest.fixture(autouse=True)
def _cache(root, monkeypatch, request):
    """A fresh cache per test, so that every run calibrates (and can be interrupted there)."""
    monkeypatch.setenv("GRAPE_CACHE", str(root / "cache" / request.node.name))


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` but the outputs and the cache, by content."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in ("cache", "runs")
    }


def _checkpoint(out: Path) -> dict[str, object]:
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    report = json.loads(files.pop("grape_report.json"))
    files["grape_report.json"] = {k: v for k, v in report.items() if k not in VOLATILE_KEYS}
    return files


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory) -> dict[str, dict]:
    """Each command's checkpoint from an uninterrupted run."""
    results = {}
    for command, args in COMMANDS.items():
        out = tmp_path_factory.mktemp("reference") / command
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("GRAPE_CACHE", str(tmp_path_factory.mktemp("reference-cache")))
            assert main([*args(root), "--out", str(out)]) == 0
        results[command] = _checkpoint(out)
    return results


def _grape_siblings(root: Path, out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _rerun(root: Path, command: str, out: Path) -> int:
    args = [*COMMANDS[command](root), "--out", str(out)]
    if command == "distill" and (out.parent / f".{out.name}.distill-ckpt").exists():
        args.append("--resume")
    return main(args)


def _check_failure_then_rerun(root, reference, command, out, before, allowed_left):
    assert not out.exists()
    assert {k: v for k, v in _snapshot(root).items() if not Path(k).name.startswith(f".{out.name}.")} == before
    left = _grape_siblings(root, out)
    assert all(any(name.startswith(f".{out.name}.{kind}") for kind in allowed_left) for name in left), left
    assert _rerun(root, command, out) == 0
    assert _grape_siblings(root, out) == []
    assert _snapshot(root) == before
    assert _checkpoint(out) == reference[command]


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_input_changes_nothing(command, root, reference):
    out = root / "runs" / f"bad-{command}"
    out.parent.mkdir(exist_ok=True)
    before = _snapshot(root)
    args = [*COMMANDS[command](root), *BAD_INPUT[command], "--out", str(out)]
    args = [str(root / "inputs" / a) if a == "missing.txt" else a for a in args]
    assert main(args) == 2
    _check_failure_then_rerun(root, reference, command, out, before, allowed_left=())


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["calibrate", "write"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigint(command, stage, root, reference, monkeypatch):
    out = root / "runs" / f"int-{command}-{stage}"
    out.parent.mkdir(exist_ok=True)
    before = _snapshot(root)
    with monkeypatch.context() as patch:
        patch.setattr(*patches(stage, command, signal.SIGINT))
        assert main([*COMMANDS[command](root), "--out", str(out)]) == 130
    _check_failure_then_rerun(root, reference, command, out, before, allowed_left=("distill-ckpt",))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["calibrate", "write"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigkill(command, stage, root, reference):
    out = root / "runs" / f"kill-{command}-{stage}"
    out.parent.mkdir(exist_ok=True)
    before = _snapshot(root)
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent), OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, str(TESTS / "fault_injection.py"), stage, "SIGKILL", *COMMANDS[command](root), "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    _check_failure_then_rerun(root, reference, command, out, before, allowed_left=("grape-lock", "grape-tmp-", "distill-ckpt"))
