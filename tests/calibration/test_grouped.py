"""Calibration of a MoE layer one group of experts at a time equals calibrating it whole.

The group size comes from the memory budget (:func:`experts_per_group`), so each case sets
``max_memory`` to exactly what ``g`` experts need and checks that only groups of ``g`` were read
and that every statistic, of every layer (so the outputs passed on too), is what one group of
all experts gives, bit for bit: the groups evaluate the same experts on the same tokens in the
same order. The whole-layer statistics are themselves checked against a float64 token-by-token
reference in ``test_collect.py``.
"""

from __future__ import annotations

import pytest
import torch
from quant_models import build_fp8_checkpoint, build_mxfp4_checkpoint
from tiny_models import build_tiny_model, write_calibration_text

from grape.calibration import collect
from grape.calibration.collect import collect_layer_stats, layer_memory
from grape.calibration.memory_plan import LayerMemory, calibration_bytes, experts_per_group
from grape.errors import InputError
from grape.model_io import LazyCausalLM
from grape.stats import LayerStats

_FIELDS = ("freq", "soft_mass", "gate_mass", "out_norm_sum", "gated_out_norm_sum", "gram", "token_logits", "token_gram", "token_out_sq", "token_resid_sq")


def _calibrate(model_dir, ids, tmp_path, group: int | None, monkeypatch) -> tuple[dict[int, LayerStats], list[int]]:
    lazy = LazyCausalLM.open(model_dir)
    sizes: list[int] = []
    original = lazy.materialized_experts

    def spy(index, experts):
        sizes.append(len(experts))
        return original(index, experts)

    monkeypatch.setattr(lazy, "materialized_experts", spy)
    baseline = 300 * 2**20  # the process's own memory, held still so that the groups are exact
    monkeypatch.setattr("grape.calibration.collect.resident_bytes", lambda: baseline)
    # every layer gets the same groups (the kept statistics' share: tests/test_dry_run.py)
    monkeypatch.setattr("grape.calibration.collect.kept_statistics_bytes", lambda *_: 0)
    budget = None
    if group is not None:
        layers = lazy.adapter.moe_layer_indices(lazy.config)
        budget = baseline + max(calibration_bytes(layer_memory(lazy, i, ids, batch_size=2, sample_tokens=10), group) for i in layers)
    stats = collect_layer_stats(lazy, ids, sample_tokens=10, batch_size=2, cache_dir=tmp_path / str(group), max_memory=budget)
    return stats, sizes


def _assert_equal(grouped: dict[int, LayerStats], whole: dict[int, LayerStats]) -> None:
    assert grouped.keys() == whole.keys()
    for layer in whole:
        for name in _FIELDS:
            torch.testing.assert_close(getattr(grouped[layer], name), getattr(whole[layer], name), rtol=0, atol=0, msg=f"layer {layer} {name}")


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_groups_of_any_size_give_the_whole_layer_statistics(arch, tmp_path, monkeypatch):
    seed = int(torch.randint(0, 10_000, ()))
    model_dir = build_tiny_model(arch, tmp_path / "model", seed=seed)
    ids = torch.randint(0, 300, (4, 9), generator=torch.Generator().manual_seed(seed))
    whole, sizes = _calibrate(model_dir, ids, tmp_path, None, monkeypatch)
    assert sizes == [8, 8]  # one read of each layer's experts
    for group in (1, 3, 8):
        grouped, sizes = _calibrate(model_dir, ids, tmp_path, group, monkeypatch)
        assert sizes == ([group] * (8 // group) + ([8 % group] if 8 % group else [])) * 2
        _assert_equal(grouped, whole)


@pytest.mark.parametrize("source", ["fp8 deepseek_v3", "fp8 qwen3_moe", "mxfp4 gpt_oss"])
def test_quantized_source_grouped_equals_whole(source, tmp_path, monkeypatch):
    """Per-expert FP8 tensors dequantized a group at a time, and rows of MXFP4 blocks/scales."""
    seed = int(torch.randint(0, 10_000, ()))
    fmt, arch = source.split()
    model_dir = build_fp8_checkpoint(arch, tmp_path / "q", seed=seed) if fmt == "fp8" else build_mxfp4_checkpoint(tmp_path / "q", seed=seed)
    ids = torch.randint(0, 200, (3, 8), generator=torch.Generator().manual_seed(1))
    whole, _ = _calibrate(model_dir, ids, tmp_path, None, monkeypatch)
    grouped, sizes = _calibrate(model_dir, ids, tmp_path, 2, monkeypatch)
    assert set(sizes) == {2}
    _assert_equal(grouped, whole)


def test_outputs_passed_on_equal_the_model_forward(tmp_path, monkeypatch):
    """The layer output built from the groups is what transformers' own layer computes (float32)."""
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model("qwen2_moe", tmp_path / "model", seed=3)
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    lazy = LazyCausalLM.open(model_dir)
    monkeypatch.setattr("grape.calibration.collect.resident_bytes", lambda: 0)
    monkeypatch.setattr("grape.calibration.collect.kept_statistics_bytes", lambda *_: 0)
    budget = calibration_bytes(layer_memory(lazy, 0, ids, batch_size=2, sample_tokens=6), 3)
    seen: list[torch.Tensor] = []
    layer_1 = lazy.model.model.layers[1]
    handle = layer_1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    collect_layer_stats(lazy, ids, sample_tokens=6, batch_size=2, cache_dir=tmp_path / "c", max_memory=budget)
    handle.remove()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reference = []
    handle = model.model.layers[1].register_forward_pre_hook(lambda _m, args: reference.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    torch.testing.assert_close(seen[-1], reference[0], rtol=1e-5, atol=1e-5)


def test_group_size_is_the_largest_that_fits():
    memory = LayerMemory(num_experts=256, expert_bytes=88 * 2**20, expert_read_bytes=0, other_bytes=2**30, activation_bytes=2**20, sample_bytes=2**28)
    baseline = 500 * 2**20  # what the process itself holds
    for group in (1, 7, 100, 256):
        budget = baseline + calibration_bytes(memory, group)
        assert experts_per_group(memory, budget, baseline) == group
        assert experts_per_group(memory, budget + memory.expert_bytes - 1, baseline) == group
    assert experts_per_group(memory, 10**15, baseline) == 256
    with pytest.raises(InputError, match="--max-memory"):
        experts_per_group(memory, baseline + calibration_bytes(memory, 1) - 1, baseline)


def test_a_budget_too_small_is_one_line_before_any_layer_runs(tmp_path, monkeypatch, capsys):
    from grape.cli import main

    model_dir = build_tiny_model("mixtral", tmp_path / "model")
    calib = write_calibration_text(tmp_path / "calib.txt")
    monkeypatch.setattr(collect, "run_layerwise", lambda *a, **k: pytest.fail("ran a layer"))
    command = ["prune", str(model_dir), "--method", "grape", "--experts-ratio", "0.25", "--calib", str(calib),
               "--calib-samples", "4", "--seq-len", "16", "--max-memory", "100MB", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(command) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    # the dry run's check refuses it first; calibration's own check (above) is the second line
    assert len(lines) == 1 and "the run would need about" in lines[0] and "--max-memory" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
