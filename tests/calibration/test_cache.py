"""The statistics cache is data: exact round trips, never executed, recomputed when not trusted."""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import grape.calibration.cache as cache_module
from grape.calibration.cache import StatsCache
from grape.errors import GrapeWarning
from grape.stats import LayerStats
from grape_kernels.routing import RoutingSpec


def _stats(layer: int = 3, experts: int = 6, samples: int = 5, *, grouped: bool = False) -> LayerStats:
    gen = torch.Generator().manual_seed(layer)
    vec = lambda: torch.rand(experts, generator=gen, dtype=torch.float64)  # noqa: E731
    spec = (
        RoutingSpec(top_k=2, score_fn="sigmoid", renormalize=True, scaling=2.5, n_group=2, topk_group=1,
                    group_score="top2_sum", correction_bias=torch.rand(experts, generator=gen))
        if grouped
        else RoutingSpec(top_k=2, renormalize=True)
    )  # fmt: skip
    return LayerStats(
        layer=layer, num_tokens=123, spec=spec, freq=vec(), soft_mass=vec(), gate_mass=vec(), out_norm_sum=vec(),
        gated_out_norm_sum=vec(), gram=torch.rand(experts, experts, generator=gen, dtype=torch.float64),
        token_logits=torch.randn(samples, experts, generator=gen, dtype=torch.float64),
        token_gram=torch.rand(samples, experts, experts, generator=gen, dtype=torch.float64),
        token_out_sq=torch.rand(samples, generator=gen, dtype=torch.float64),
        token_resid_sq=torch.rand(samples, generator=gen, dtype=torch.float64),
    )  # fmt: skip


def _assert_same(a: LayerStats, b: LayerStats) -> None:
    for f in fields(LayerStats):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y) and x.dtype == y.dtype, f.name
        elif f.name == "spec":
            assert {k: v for k, v in vars(x).items() if k != "correction_bias"} == {
                k: v for k, v in vars(y).items() if k != "correction_bias"
            }
            assert (x.correction_bias is None) == (y.correction_bias is None)
            if x.correction_bias is not None:
                assert torch.equal(x.correction_bias, y.correction_bias)
        else:
            assert x == y, f.name


@pytest.mark.parametrize("grouped", [False, True])
def test_round_trip_is_exact(tmp_path, grouped):
    stats = _stats(grouped=grouped)
    StatsCache(tmp_path, "key").save(stats)
    assert [p.name for p in (tmp_path / "key").iterdir()] == ["layer_0003.safetensors"]
    _assert_same(StatsCache(tmp_path, "key").load(3), stats)
    assert StatsCache(tmp_path, "key").load(4) is None  # absent: no warning, just None


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "pickle":
        path.write_bytes(pickle.dumps(_Payload(path.parent / "PWNED")))
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"\xff" * 64)


@pytest.mark.parametrize("how", ["pickle", "truncated", "empty", "garbage"])
def test_a_damaged_file_is_distrusted_with_one_warning_and_never_executed(tmp_path, how):
    cache = StatsCache(tmp_path, "key")
    cache.save(_stats())
    _damage(cache.path(3), how)
    with pytest.warns(GrapeWarning, match="ignoring cache file .*layer_0003.safetensors"):
        assert cache.load(3) is None
    assert not (tmp_path / "key" / "PWNED").exists()


def test_a_file_written_for_another_key_layer_or_shape_is_distrusted(tmp_path):
    StatsCache(tmp_path, "other").save(_stats())
    os.replace(tmp_path / "other" / "layer_0003.safetensors", tmp_path / "other" / "layer_0004.safetensors")
    with pytest.warns(GrapeWarning, match="another model, calibration set or layer"):
        assert StatsCache(tmp_path, "other").load(4) is None
    (tmp_path / "key").mkdir()
    os.replace(tmp_path / "other" / "layer_0004.safetensors", tmp_path / "key" / "layer_0004.safetensors")
    with pytest.warns(GrapeWarning, match="another model"):
        assert StatsCache(tmp_path, "key").load(4) is None

    bad = _stats()
    bad.gram = bad.gram[:, :3]
    StatsCache(tmp_path, "shape").save(bad)
    with pytest.warns(GrapeWarning, match=r"gram should be float64 of shape \(6, 6\)"):
        assert StatsCache(tmp_path, "shape").load(3) is None


def test_a_writer_racing_on_the_same_file_does_not_break_the_other(tmp_path, monkeypatch):
    """Two runs with the same key save the same layer at once: each uses its own temporary file,
    so neither finds its file moved away by the other (a fixed temp name made one fail)."""
    cache, other = StatsCache(tmp_path, "key"), StatsCache(tmp_path, "key")
    real_replace = os.replace
    raced = []

    def replace_after_the_other_run(src, dst):
        if not raced:
            raced.append(src)
            other.save(_stats())  # the other run writes and renames in between
        real_replace(src, dst)

    monkeypatch.setattr(cache_module.os, "replace", replace_after_the_other_run)
    cache.save(_stats())
    monkeypatch.undo()
    _assert_same(cache.load(3), _stats())
    assert [p.name for p in (tmp_path / "key").iterdir()] == ["layer_0003.safetensors"]


def test_an_unwritable_cache_warns_once_and_the_run_goes_on(tmp_path):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache folder should be")
    cache = StatsCache(blocker, "key")
    with pytest.warns(GrapeWarning, match="cannot write the statistics cache"):
        cache.save(_stats())
    cache.save(_stats(layer=4))  # no second warning, no error
    assert cache.load(3) is None


def test_stale_temporaries_are_removed(tmp_path):
    cache = StatsCache(tmp_path, "key")
    cache.save(_stats())
    old, fresh = tmp_path / "key" / ".layer_0001.safetensors.abc.tmp", tmp_path / "key" / ".layer_0002.safetensors.def.tmp"
    old.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    stale = time.time() - 2 * 3600
    os.utime(old, (stale, stale))
    StatsCache(tmp_path, "key")
    assert not old.exists() and fresh.exists()
