"""The suites runner and its plugin on a synthetic suite: forcing, counting, the taken-path assertion.

The real suites need a transformers checkout (see ``run_suites.py``); CI has none, so this test
builds a stand-in: a source package whose ``tests/test_modeling_common.py`` holds a small mixin
running a tiny Mixtral, and a checkout whose model test file uses it. One test there runs
experts through a path other than grape's without asking for it: the grape run must fail it
and the report must list it, which proves the assertion can fail.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import run_suites
import transformers

COMMON = '''
import torch
from transformers import MixtralConfig, MixtralForCausalLM


class ModelTesterMixin:
    hidden_act = "silu"

    def _model(self):
        torch.manual_seed(0)
        config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=64, num_local_experts=4, num_experts_per_tok=2,
                               hidden_act=self.hidden_act)
        return MixtralForCausalLM(config).eval()

    def _forward(self, model):
        with torch.no_grad():
            return model(torch.arange(8).view(1, 8)).logits

    def test_forward(self):
        self.assertEqual(self._forward(self._model()).shape, (1, 8, 64))

    def test_explicit_eager(self):
        model = self._model()
        model.set_experts_implementation("eager")
        self._forward(model)
'''

MODEL_TESTS = '''
import unittest

from ...test_modeling_common import ModelTesterMixin


class SiluTest(ModelTesterMixin, unittest.TestCase):
    pass


class GeluTest(ModelTesterMixin, unittest.TestCase):
    hidden_act = "gelu"


class BypassTest(ModelTesterMixin, unittest.TestCase):
    def test_bypass(self):
        model = self._model()
        model.config._experts_implementation_internal = "grouped_mm"  # not through transformers' resolution
        self._forward(model)
'''


def _sdist(path: Path) -> Path:
    top = f"transformers-{transformers.__version__}"
    archive = path / f"{top}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = COMMON.encode()
        info = tarfile.TarInfo(f"{top}/tests/test_modeling_common.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return archive


def _checkout(path: Path) -> Path:
    tests = path / "tests"
    (tests / "models" / "mixtral").mkdir(parents=True)
    for package in (tests, tests / "models", tests / "models" / "mixtral"):
        (package / "__init__.py").write_text("")
    (tests / "test_modeling_common.py").write_text('raise ImportError("the pinned version\'s copy must replace this")\n')
    (tests / "models" / "mixtral" / "test_modeling_mixtral.py").write_text(MODEL_TESTS)
    return path


def test_runner_forces_grape_counts_kernels_and_reports_a_path_not_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(run_suites, "TEST_REQUIREMENTS", ())  # the synthetic suite imports neither
    out = tmp_path / "out"
    code = run_suites.main([
        "--transformers-tests", str(_checkout(tmp_path / "checkout")), "--sdist", str(_sdist(tmp_path)),
        "--models", "mixtral", "--out", str(out),
    ])
    assert code == 1, (out / "mixtral-grape.log").read_text()
    (result,) = json.loads((out / "transformers_suites.json").read_text())
    assert result["outcomes"]["default"]["passed"] == 7
    assert [r["test"].rsplit(".", 1)[-1] for r in result["regressions"]] == ["BypassTest::test_bypass"]
    assert "grape was forced but experts ran {'grouped_mm': 1}" in result["regressions"][0]["message"]

    counts = json.loads((out / "mixtral-grape-counts.json").read_text())["tests"]
    by_name = {test.split("::", 1)[1]: record for test, record in counts.items()}
    assert by_name["SiluTest::test_forward"]["dispatch"] == {"grape": 1}
    assert sum(by_name["SiluTest::test_forward"]["kernels"].values()) == 1  # reached a grape kernel
    assert by_name["GeluTest::test_forward"]["dispatch"] == {"grape": 1}
    assert by_name["GeluTest::test_forward"]["kernels"] == {}  # GELU: transformers' path, on purpose
    assert by_name["SiluTest::test_explicit_eager"]["explicit"] == ["eager"]
    default = json.loads((out / "mixtral-default-counts.json").read_text())["tests"]
    assert all("grape" not in record["dispatch"] for record in default.values())
    assert "REGRESSION" in (out / "transformers_suites.md").read_text()


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert run_suites.main(["--transformers-tests", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert run_suites.main(["--transformers-tests", str(tmp_path), "--models", "llama"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert not (tmp_path / "o").exists()
