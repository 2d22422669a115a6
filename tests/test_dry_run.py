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
    under = ["--seq-len", "128", "--max-memory", str(budget)]  # planned under the same budget: the same expert groups
    smaller = _plan([*big[:-4], "--calib-samples", str(samples), *under], capsys)
    larger = _plan([*big[:-4], "--calib-samples", str(samples + 1), *under], capsys)
    assert smaller["peak_rss_bytes"] <= budget < larger["peak_rss_bytes"]


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_the_dry_run_predicts_the_groups_calibration_will_use(arch, tmp_path):
    """One formula: the terms the dry run derives from shapes are the ones calibration derives
    from the loaded layer, so both choose the same expert groups under any budget."""
    import torch

    from grape.calibration import memory_plan
    from grape.calibration.collect import layer_memory
    from grape.dry_run import layer_shapes, model_workload
    from grape.memory_model import calibration_bytes, grouped_layer_memory
    from grape.model_io import LazyCausalLM

    lazy = LazyCausalLM.open(build_tiny_model(arch, tmp_path / arch))
    samples, seq_len, batch_size, sample_tokens = 4, 16, 8, 32
    ids = torch.randint(0, lazy.config.vocab_size, (samples, seq_len))
    work = model_workload(lazy, "prune", samples=samples, seq_len=seq_len, batch_size=batch_size, sample_tokens=sample_tokens)
    shapes = layer_shapes(lazy)
    for i in lazy.adapter.moe_layer_indices(lazy.config):
        theirs = layer_memory(lazy, i, ids, batch_size=batch_size, sample_tokens=sample_tokens)
        ours = grouped_layer_memory(shapes[i], work)
        assert ours == theirs
        for group in (1, 3, theirs.num_experts):
            baseline = 500 * 2**20
            budget = baseline + memory_plan.calibration_bytes(theirs, group)
            assert memory_plan.experts_per_group(ours, budget, baseline) == group
            assert calibration_bytes(shapes[i], work, group=group) == budget - baseline


def test_calibration_and_the_dry_run_size_each_layers_groups_alike(tmp_path, monkeypatch):
    """Each layer's groups fit what the statistics kept from earlier layers leave: calibration
    (spied) and the dry run's estimate choose the same group for every layer, and the kept bytes
    they assume are what the statistics really hold."""
    import dataclasses

    import torch

    import grape.calibration.collect as collect
    from grape.calibration import memory_plan
    from grape.dry_run import estimate, model_workload
    from grape.model_io import LazyCausalLM

    held = 400 * 2**20
    monkeypatch.setattr(collect, "resident_bytes", lambda: held)
    lazy = LazyCausalLM.open(build_tiny_model("mixtral", tmp_path / "m", num_hidden_layers=4))
    samples, seq_len, batch_size, sample_tokens = 4, 16, 2, 48
    ids = torch.randint(0, lazy.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(1))
    memory = collect.layer_memory(lazy, 0, ids, batch_size=batch_size, sample_tokens=sample_tokens)
    kept = memory_plan.kept_statistics_bytes(memory.num_experts, sample_tokens)
    # room for one expert plus three layers' statistics: each later layer has less of it left
    budget = held + memory_plan.calibration_bytes(memory, 1) + 3 * kept + memory.expert_bytes // 2
    assert memory.expert_bytes <= kept < 2 * memory.expert_bytes  # so the groups shrink with depth, within E
    chosen: dict[int, int] = {}
    real_measure = collect.measure_layer

    def spy(lazy_, index, *args, **kwargs):
        chosen[index] = kwargs["experts_per_group"]
        return real_measure(lazy_, index, *args, **kwargs)

    monkeypatch.setattr(collect, "measure_layer", spy)
    stats = collect.collect_layer_stats(
        lazy, ids, sample_tokens=sample_tokens, batch_size=batch_size, cache_dir=tmp_path / "c", use_cache=False, max_memory=budget
    )  # fmt: skip
    work = model_workload(lazy, "prune", samples=samples, seq_len=seq_len, batch_size=batch_size, sample_tokens=sample_tokens)
    planned = {e["layer"]: e["calibration_group"] for e in estimate(lazy, work, budget=budget, baseline=held)["layers"]}
    assert chosen == planned and chosen[3] == 1 < chosen[0]
    for layer_stats in stats.values():
        tensors = [v for v in (getattr(layer_stats, f.name) for f in dataclasses.fields(layer_stats)) if isinstance(v, torch.Tensor)]
        assert sum(t.nbytes for t in tensors) == kept
