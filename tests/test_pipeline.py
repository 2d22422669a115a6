"""The shared pipeline: stages in order, the output claimed from validate to the end, the report
assembled once and written into the output before it appears."""

from __future__ import annotations

import json

import pytest
from tiny_models import build_tiny_model

import grape.report
from grape.errors import OutputBusyError
from grape.output_guard import claim_output
from grape.pipeline import STAGES, CommonOptions, Pipeline, run_pipeline


class Recording(Pipeline):
    step = "recording"

    def __init__(self, options, fail_at=None):
        super().__init__(options)
        self.calls: list[str] = []
        self.fail_at = fail_at

    def _record(self, stage):
        self.calls.append(stage)
        if stage == self.fail_at:
            raise KeyboardInterrupt

    def open(self):
        self._record("open")
        super().open()

    def validate(self):
        self._record("validate")

    def calibrate(self):
        self._record("calibrate")
        with pytest.raises(OutputBusyError):  # the output is claimed while the work runs
            claim_output(self.options.out, inputs={}, overwrite=False)

    def plan(self):
        self._record("plan")

    def transform_layer(self, index, layer):
        self._record(f"layer {index}")

    def report_sections(self):
        self._record("report")
        return {"answer": 42}

    def finished(self):
        self._record("finished")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model("mixtral", tmp_path_factory.mktemp("pipeline") / "model")


def test_stages_run_in_order_and_the_report_is_written_once(model, tmp_path, monkeypatch):
    writes = []
    real = grape.report.write_json_atomic
    monkeypatch.setattr(grape.report, "write_json_atomic", lambda obj, path: writes.append(path) or real(obj, path))
    pipeline = Recording(CommonOptions(model=str(model), out=str(tmp_path / "out")))
    report = run_pipeline(pipeline)
    assert pipeline.calls == ["open", "validate", "calibrate", "plan", "layer 0", "layer 1", "report", "finished"]
    assert len(writes) == 1 and writes[0].parent.name.startswith(".out.grape-tmp-")  # before the rename
    saved = json.loads((tmp_path / "out" / "grape_report.json").read_text())
    assert saved == report and saved["answer"] == 42 and saved["step"] == "recording"
    assert set(saved["timings_s"]) == {"setup", "calibration", "planning", "save", "total"}
    assert saved["files"] == sorted(p.name for p in (tmp_path / "out").iterdir())
    assert saved["options"]["model"] == str(model) and "out" not in saved["options"]
    assert saved["parameters_before"] == saved["parameters_after"] and saved["experts_per_layer"] == [8, 8]
    assert STAGES == ("open", "validate", "calibrate", "plan", "write", "report")


@pytest.mark.parametrize("stage", ["validate", "calibrate", "plan", "report"])
def test_a_failing_stage_leaves_nothing_and_skips_the_rest(stage, model, tmp_path):
    pipeline = Recording(CommonOptions(model=str(model), out=str(tmp_path / "out")), fail_at=stage)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(pipeline)
    assert pipeline.calls[-1] == stage and "finished" not in pipeline.calls
    assert list(tmp_path.iterdir()) == []
