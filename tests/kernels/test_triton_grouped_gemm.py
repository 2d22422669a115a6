"""Triton fused experts (grouped GEMMs + top-k reduction) against a float64 per-expert loop.

The reference below is written from the layout descriptions alone (it never shares index
maths with the kernels): per expert, gather its tokens, multiply by that expert's weights in
float64 exactly as transformers lays them out, apply the activation, project down, weight and
accumulate. Inputs are fresh random tensors per case; the case grid over E / top_k / tokens /
dtype / layout is sampled rather than crossed to keep the interpreter fast. The tuning-table
loader is tested here too because it decides the kernels' block sizes.
"""

from __future__ import annotations

import importlib.util
import json
import zlib
from pathlib import Path

import pytest
import torch
from triton_device import DEVICE, require_interpreted

pytest.importorskip("triton")

from grape_kernels.expert_weights import ExpertWeights  # noqa: E402
from grape_kernels.triton import (  # noqa: E402
    KernelConfig,
    fused_experts,
    tuning,  # noqa: E402
)
from grape_kernels.triton import grouped_gemm as triton_gemm  # noqa: E402

require_interpreted(triton_gemm._gate_up_kernel)

interpreter = pytest.mark.interpreter
F32, F16 = torch.float32, torch.float16
HIDDEN, INTER = 32, 48


def reference_experts(
    hidden, w_gate_up, w_down, topk_ids, topk_weights, *, gate_up_bias=None, down_bias=None,
    activation="silu", alpha=1.702, limit=7.0, transposed=False, interleaved=False,
) -> torch.Tensor:  # fmt: skip
    """Float64 per-expert loop over transformers' weight layouts."""
    x = hidden.double().cpu()
    ids = topk_ids.long().cpu()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for expert in range(w_gate_up.shape[0]):
        tokens, slots = torch.where(ids == expert)
        if tokens.numel() == 0:
            continue
        w1 = w_gate_up[expert].double().cpu()
        w1 = w1 if transposed else w1.t()  # (H, 2I)
        h = x[tokens] @ w1
        if gate_up_bias is not None:
            h = h + gate_up_bias[expert].double().cpu()
        inter = h.shape[1] // 2
        gate, up = (h[:, 0::2], h[:, 1::2]) if interleaved else (h[:, :inter], h[:, inter:])
        if activation == "silu":
            act = gate * torch.sigmoid(gate) * up
        else:
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
            act = (up + 1) * gate * torch.sigmoid(alpha * gate)
        w2 = w_down[expert].double().cpu()
        y = act @ (w2 if transposed else w2.t())  # (I, H)
        if down_bias is not None:
            y = y + down_bias[expert].double().cpu()
        out.index_add_(0, tokens, y * topk_weights.double().cpu()[tokens, slots, None])
    return out


def _make_ids(kind: str, tokens: int, top_k: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "all_to_one":  # every token's slot j goes to the same expert: others get nothing
        return torch.tensor([(3 + 2 * j) % experts for j in range(top_k)]).repeat(tokens, 1)
    ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k]
    if kind == "dropped" and tokens:  # transformers marks masked slots with id E; -1 too
        ids[0, 0] = experts
        ids[-1, -1] = -1
    return ids


def _problem(experts, top_k, tokens, dtype, *, layout="standard", ids_kind="random", hidden=HIDDEN, inter=INTER):
    """Random inputs of one case plus the matching fused_experts keyword arguments."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((experts, top_k, tokens, dtype, layout, ids_kind)).encode()))
    transposed = layout in ("gpt_oss", "transposed")
    interleaved = layout in ("gpt_oss", "interleaved")
    with_bias = layout in ("gpt_oss", "interleaved")
    shape_gu = (experts, hidden, 2 * inter) if transposed else (experts, 2 * inter, hidden)
    shape_d = (experts, inter, hidden) if transposed else (experts, hidden, inter)
    args = dict(
        hidden=torch.randn(tokens, hidden, generator=gen),
        w_gate_up=torch.randn(shape_gu, generator=gen) / hidden**0.5,
        w_down=torch.randn(shape_d, generator=gen) / inter**0.5,
        topk_ids=_make_ids(ids_kind, tokens, top_k, experts, gen).to(torch.int32),
        topk_weights=torch.rand(tokens, top_k, generator=gen),
    )
    options = dict(transposed=transposed, interleaved=interleaved)
    if with_bias:
        args["gate_up_bias"] = torch.randn(experts, 2 * inter, generator=gen) * 0.5
        args["down_bias"] = torch.randn(experts, hidden, generator=gen) * 0.5
    if layout == "gpt_oss":  # a small limit so both clamps are active on N(0, 1) activations
        options.update(activation="gpt_oss", swiglu_alpha=1.702, swiglu_limit=0.75)
    for name in ("hidden", "w_gate_up", "w_down", "gate_up_bias", "down_bias"):
        if name in args:
            args[name] = args[name].to(dtype)
    return {name: value.to(DEVICE) for name, value in args.items()}, options


def _tolerance(dtype: torch.dtype) -> dict:
    # fp16 rounds the activation, each slot's output and the final sum to 11 bits, bf16 to 8
    return {F32: dict(rtol=1e-4, atol=1e-4), F16: dict(rtol=2e-2, atol=2e-2)}.get(dtype, dict(rtol=6e-2, atol=6e-2))


def _call(args: dict, options: dict, config: KernelConfig | None = None) -> torch.Tensor:
    """fused_experts on one case from ``_problem``: its tensors plus the layout ``options``."""
    weights = ExpertWeights(args["w_gate_up"], args["w_down"], args.get("gate_up_bias"), args.get("down_bias"),
                            **options)
    return fused_experts(args["hidden"], weights, args["topk_ids"], args["topk_weights"], config=config)


def _check(args: dict, options: dict, config: KernelConfig | None = None) -> None:
    out = _call(args, options, config)
    dtype = args["hidden"].dtype
    assert out.shape == args["hidden"].shape and out.dtype == dtype and out.device == args["hidden"].device
    expected = reference_experts(
        args["hidden"],
        args["w_gate_up"],
        args["w_down"],
        args["topk_ids"],
        args["topk_weights"],
        gate_up_bias=args.get("gate_up_bias"),
        down_bias=args.get("down_bias"),
        activation=options.get("activation", "silu"),
        alpha=options.get("swiglu_alpha", 1.702),
        limit=options.get("swiglu_limit", 7.0),
        transposed=options["transposed"],
        interleaved=options["interleaved"],
    )
    torch.testing.assert_close(out.double().cpu(), expected, **_tolerance(dtype))


FUSED_CASES = [
    # (E, top_k, tokens, dtype, layout, ids kind)
    (1, 1, 7, F32, "standard", "random"),  # E == top_k == 1
    (2, 2, 1, F16, "standard", "random"),  # E == top_k
    (3, 2, 300, F32, "standard", "random"),
    (5, 4, 7, F16, "standard", "random"),
    (8, 2, 300, F16, "standard", "random"),
    (13, 4, 7, F32, "standard", "random"),
    (64, 8, 300, F32, "standard", "random"),  # (runs with one 128-row tile per expert, below)
    (8, 2, 0, F32, "standard", "random"),  # no tokens
    (8, 2, 300, F32, "standard", "all_to_one"),  # six experts get no tokens
    (13, 1, 7, F16, "standard", "dropped"),  # ids E and -1 contribute nothing
    (8, 4, 7, F32, "gpt_oss", "random"),  # transposed + interleaved + biases + clamped SwiGLU
    (5, 2, 300, F16, "gpt_oss", "random"),
    (5, 2, 7, F32, "transposed", "random"),
    (5, 2, 7, F16, "interleaved", "random"),  # standard layout, interleaved gate/up, biases
]
if DEVICE == "cuda":  # the interpreter computes bfloat16 wrongly (triton-lang/triton#4972): compiled kernels only
    FUSED_CASES += [
        (2, 2, 1, torch.bfloat16, "standard", "random"),
        (8, 2, 300, torch.bfloat16, "standard", "random"),
        (64, 8, 300, torch.bfloat16, "standard", "random"),
        (13, 1, 7, torch.bfloat16, "standard", "dropped"),
        (8, 4, 300, torch.bfloat16, "gpt_oss", "random"),
    ]


@interpreter
@pytest.mark.parametrize("experts, top_k, tokens, dtype, layout, ids_kind", FUSED_CASES)
def test_fused_experts_matches_float64_loop(experts, top_k, tokens, dtype, layout, ids_kind):
    args, options = _problem(experts, top_k, tokens, dtype, layout=layout, ids_kind=ids_kind)
    # The interpreter pays per program: with 64 experts the table's 32-row tiles would mean
    # hundreds of programs, so that case uses 128-row tiles (the table path is covered above).
    config = KernelConfig(128, 128, 32, 8, 4, 2) if experts == 64 else None
    _check(args, options, config)


@interpreter
@pytest.mark.parametrize("layout", ["standard", "gpt_oss"])
def test_fused_experts_non_contiguous_inputs(layout):
    """Strided views of every input: results must not depend on memory layout."""
    args, options = _problem(8, 2, 7, F16, layout=layout)

    def strided(t: torch.Tensor) -> torch.Tensor:  # same values, every dim strided
        wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]

    args["hidden"] = strided(args["hidden"])
    args["topk_ids"] = args["topk_ids"].t().contiguous().t()
    args["topk_weights"] = strided(args["topk_weights"])
    # a weight whose reduction axis is not the unit-stride one
    args["w_gate_up"] = args["w_gate_up"].transpose(1, 2).contiguous().transpose(1, 2)
    args["w_down"] = strided(args["w_down"])
    for name in ("gate_up_bias", "down_bias"):
        if name in args:
            args[name] = strided(args[name])
    assert not any(t.is_contiguous() for t in (args["hidden"], args["w_gate_up"], args["w_down"]))
    _check(args, options)


EXPLICIT_CONFIGS = [
    KernelConfig(16, 32, 32, 4, 4, 2),  # tails in K (40 % 32) and N (24 % 16, 40 % 32); GROUP_M > 1
    KernelConfig(32, 64, 16, 1, 4, 3),
    KernelConfig(64, 16, 64, 8, 4, 2),  # gate_up tiles of 8 activation columns
]


@interpreter
@pytest.mark.parametrize("config", EXPLICIT_CONFIGS, ids=lambda c: f"{c.block_m}x{c.block_n}x{c.block_k}")
@pytest.mark.parametrize("layout", ["standard", "gpt_oss"])
def test_fused_experts_explicit_configs_with_ragged_tiles(config, layout):
    args, options = _problem(6, 2, 40, F32, layout=layout, hidden=40, inter=24)
    _check(args, options, config)


def _bad_cases():
    def base(**changes):
        args, options = _problem(4, 2, 3, F32)
        args.update(changes)
        return args, options

    yield "hidden 3-D", lambda: base(hidden=torch.randn(1, 3, HIDDEN)), "hidden must be 2-D"
    yield "hidden int", lambda: base(hidden=torch.ones(3, HIDDEN, dtype=torch.int32)), "hidden must be float16"
    yield "weight dtype", lambda: base(w_down=torch.randn(4, HIDDEN, INTER, dtype=F16)), "w_down is torch.float16"
    yield "wrong H", lambda: base(w_gate_up=torch.randn(4, 2 * INTER, HIDDEN + 1)), "does not take hidden size"
    yield "odd 2I", lambda: base(w_gate_up=torch.randn(4, 2 * INTER + 1, HIDDEN)), "is not 2\\*I"
    yield "down mismatch", lambda: base(w_down=torch.randn(4, HIDDEN, INTER + 1)), "w_down .* does not match"
    yield "expert count", lambda: base(w_down=torch.randn(5, HIDDEN, INTER)), "w_down .* does not match"
    yield "float ids", lambda: base(topk_ids=torch.zeros(3, 2)), "topk_ids must be int32 or int64"
    yield "ids rows", lambda: base(topk_ids=torch.zeros(4, 2, dtype=torch.int32)), "topk_ids has 4 rows"
    yield "top_k > E", lambda: base(
        topk_ids=torch.zeros(3, 5, dtype=torch.int32), topk_weights=torch.rand(3, 5)
    ), "top_k=5 must be in"
    yield "weights shape", lambda: base(topk_weights=torch.rand(3, 3)), "does not match topk_ids"
    yield "bias shape", lambda: base(gate_up_bias=torch.randn(4, INTER)), "gate_up_bias must have shape"
    yield "device", lambda: base(w_down=torch.randn(4, HIDDEN, INTER, device="meta")), "w_down is on meta"


@pytest.mark.parametrize("make, match", [(make, match) for _, make, match in _bad_cases()],
                         ids=[name for name, _, _ in _bad_cases()])  # fmt: skip
def test_fused_experts_rejects_bad_input(make, match):
    args, options = make()
    args = {k: v.cpu() if v.device.type != "meta" else v for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        _call(args, options)


def test_fused_experts_rejects_bad_activation():
    args, options = _problem(4, 2, 3, F32)
    with pytest.raises(ValueError, match="unknown activation"):
        _call(args, {**options, "activation": "gelu"})


def _table_json(**shapes) -> dict:
    small = KernelConfig(16, 32, 64, 1, 4, 2).to_dict()
    large = KernelConfig(128, 128, 64, 8, 8, 3).to_dict()
    return {"format": tuning.TABLE_FORMAT, "default": {"1": small, "256": large}, "shapes": shapes}


def test_tuning_lookup_picks_nearest_bucket_and_shape():
    special = KernelConfig(64, 64, 32, 4, 4, 4)
    table = tuning.TuningTable.from_json(_table_json(**{"N=96,K=32": {"8": special.to_dict()}}))
    assert table.lookup(10, 10, 0.01).block_m == 16  # below every bucket: the smallest
    assert table.lookup(10, 10, 12.0).block_m == 16  # log-nearest to 1 rather than 256
    assert table.lookup(10, 10, 20.0).block_m == 128
    assert table.lookup(96, 32, 1.0) == special  # the shape's own buckets win
    again = tuning.TuningTable.from_json(json.loads(json.dumps(table.to_json())))
    assert again == table


def test_tuning_shipped_table_is_valid_and_used_by_default(monkeypatch):
    monkeypatch.delenv(tuning.TUNING_ENV_VAR, raising=False)
    tuning.set_table(None)
    shipped = tuning.TuningTable.load(tuning.DEFAULT_TABLE_PATH)
    assert tuning.active_table() == shipped
    assert min(shipped.default) <= 1 and max(shipped.default) >= 1024


def test_tuning_table_from_env_and_override(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(_table_json()))
    monkeypatch.setenv(tuning.TUNING_ENV_VAR, str(path))
    tuning.set_table(None)
    assert tuning.active_table().lookup(1, 1, 300).block_m == 128
    try:
        tuning.set_table(tuning.TuningTable.from_json(_table_json(), "x"))
        assert tuning.active_table().lookup(1, 1, 1).block_m == 16
    finally:
        tuning.set_table(None)


@pytest.mark.parametrize(
    "obj, match",
    [
        ({"format": "other"}, "not a grape-triton-moe/1"),
        ({"format": tuning.TABLE_FORMAT, "default": {}}, "non-empty"),
        ({"format": tuning.TABLE_FORMAT, "default": {"x": {}}}, "not a number"),
        (_table_json(**{"96x32": {"1": KernelConfig(16, 16, 16, 1, 4, 2).to_dict()}}), "N=<int>,K=<int>"),
        ({"format": tuning.TABLE_FORMAT, "default": {"1": {"BLOCK_M": 16}}}, "exactly the keys"),
        (_table_json() | {"default": {"1": _table_json()["default"]["1"] | {"BLOCK_K": 24}}}, "power of two"),
    ],
)
def test_tuning_table_rejects_malformed_tables(obj, match):
    with pytest.raises(ValueError, match=match):
        tuning.TuningTable.from_json(obj)


def test_fit_shared_memory_shrinks_stages_then_tiles():
    config = KernelConfig(128, 256, 64, 8, 8, 4)
    assert config.shared_memory_bytes(2) == 4 * (128 * 64 + 64 * 256) * 2
    fitted = tuning.fit_shared_memory(config, 4, 232448)  # fp32 on an H100
    assert fitted.shared_memory_bytes(4) <= 232448
    assert (fitted.num_stages, fitted.block_k, fitted.block_m) == (2, 64, 128)
    tiny = tuning.fit_shared_memory(config, 2, 16 * 1024)
    assert tiny.shared_memory_bytes(2) <= 16 * 1024 and tiny.num_stages == 2


def _load_tuner():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "tune_triton.py"
    spec = importlib.util.spec_from_file_location("tune_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tuner_refuses_politely_without_gpu(tmp_path, monkeypatch, capsys):
    tuner = _load_tuner()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "table.json"
    assert tuner.main(["--hidden", "64", "--intermediate", "32", "--out", str(out)]) == 1
    assert "CUDA GPU" in capsys.readouterr().err and not out.exists()


def test_tuner_candidates_and_table_entries():
    tuner = _load_tuner()
    assert tuner.bucket_of(1, 8, 128) == 0.0625 and tuner.bucket_of(300, 2, 5) == 128.0
    small = tuner.candidate_configs(1.0, 2, 232448, quick=True)
    assert small and all(c.block_m == 16 for c in small)
    tight = tuner.candidate_configs(512.0, 4, 64 * 1024, quick=False)
    assert tight and all(c.shared_memory_bytes(4) <= 64 * 1024 for c in tight)
    assert max(c.block_m for c in tight) == 128
    table = tuning.TuningTable.load(tuning.DEFAULT_TABLE_PATH)
    merged = tuner.merge_entry(table, 96, 32, 0.0625, small[0], "gpu", "note")
    again = tuning.TuningTable.from_json(json.loads(json.dumps(merged.to_json())))
    assert again.lookup(96, 32, 0.05) == small[0] and again.default == table.default
    assert (96, 32) not in table.shapes  # the input table is left untouched
