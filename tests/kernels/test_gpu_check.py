"""benchmarks/gpu_check.py without a GPU: it refuses cleanly, and its pieces work where they can run.

The script has not run on a GPU here. What is checked: the refusal (one line, exit 2, nothing
written); the stage runner's time limits and logs on real subprocesses; the junit summary on a
real pytest run; and the benchmark itself on the CPU, on a small layer, measured for real,
through to the JSON and markdown report.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def test_refuses_without_cuda_in_one_line_and_writes_nothing(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report"
    assert gpu_check.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]
    assert not out.exists()


def test_refuses_from_the_command_line_too(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "r")], capture_output=True, text=True,
                            timeout=120)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run")
    assert result.returncode == 2 and "Traceback" not in result.stderr and not (tmp_path / "r").exists()


def test_stage_runner_records_success_failure_and_timeout(gpu_check, tmp_path):
    ok = gpu_check.run_stage("a", [sys.executable, "-c", "print('done')"], 60, tmp_path / "a.log")
    failed = gpu_check.run_stage("b", [sys.executable, "-c", "raise SystemExit('broken')"], 60, tmp_path / "b.log")
    slow = gpu_check.run_stage("c", [sys.executable, "-c", "import time; time.sleep(30)"], 1, tmp_path / "c.log")
    assert (ok.status, failed.status, slow.status) == ("ok", "failed", "timeout")
    assert "done" in (tmp_path / "a.log").read_text() and "broken" in failed.detail
    assert slow.seconds < 10


def test_junit_summary_counts_a_real_pytest_run(gpu_check, tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_pass(): pass\n"
        "def test_fail(): assert False\n"
        "@pytest.mark.skip(reason='x')\n"
        "def test_skip(): pass\n"
    )
    xml = tmp_path / "tests.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                    f"--junitxml={xml}", "test_sample.py"], capture_output=True, timeout=120, cwd=tmp_path)
    summary = gpu_check.junit_summary(xml)
    assert (summary["tests"], summary["passed"], summary["failed"], summary["skipped"]) == (3, 1, 1, 1)
    assert summary["failures"] == ["test_sample::test_fail"]
    assert gpu_check.junit_summary(tmp_path / "missing.xml")["tests"] == 0


def test_benchmark_and_report_run_on_the_cpu(gpu_check, tmp_path):
    device = torch.device("cpu")
    peaks = gpu_check.measure_peaks(device, size=256)
    assert peaks["bandwidth"] > 0 and peaks["gemm_flops"] > 0
    layer = gpu_check.Layer("tiny", hidden=64, inter=32, experts=6, top_k=2)
    rows = gpu_check.benchmark((layer,), (1, 16, 1024), device, peaks)
    assert {row["impl"] for row in rows} == {"grape-cpu", "transformers-grouped_mm"}
    assert len(rows) == 6 and not any("error" in row for row in rows)
    for row in rows:
        assert row["ms"] > 0 and row["tokens_per_s"] == pytest.approx(row["tokens"] / row["ms"] * 1e3)
        assert row["max_rel_err"] < 2e-2  # bf16; grouped_mm itself reads 0
        assert (row["hbm_pct"] is not None) == (row["tokens"] <= 16)
        assert (row["peak_pct"] is not None) == (row["tokens"] >= 1024)
    report = {"environment": gpu_check.environment(), "stages": [{"name": "bench", "status": "ok", "seconds": 1.0,
                                                                  "detail": ""}],
              "benchmark": {"peaks": peaks, "rows": rows}}
    gpu_check.write_report(report, tmp_path)
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == report
    table = (tmp_path / "gpu_check.md").read_text()
    assert sum(line.startswith("| tiny |") for line in table.splitlines()) == 6
    assert not list(tmp_path.glob(".*partial"))
