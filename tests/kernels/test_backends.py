"""Every experts backend against an independent float64 loop, plus dispatch and bad input.

The oracle below is written out here on purpose (not imported from grape_kernels): it gathers
each expert's (token, slot) pairs and runs that expert in float64, with the two gated
activations spelled out, so a shared mistake in ``grape_kernels.ops.common`` cannot hide in
both sides.
Inputs are fresh random tensors per case (seeded by the case), in float32 and bfloat16; the
bfloat16 oracle runs on the bfloat16-rounded inputs, so the tolerance only covers the
backend's own rounding. The Triton backend joins when it can run here (``TRITON_INTERPRET=1``,
set by this directory's conftest), on a sampled float32 subset because the interpreter is slow
and computes bfloat16 wrongly.
"""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch

from grape_kernels import (
    Backend,
    ExpertWeights,
    available_backends,
    backend_status,
    experts_forward,
    get_backend,
    routing_function,
    select_backend,
    select_routing_backend,
)
from grape_kernels import backends as backends_module
from grape_kernels.backends import resolve_backend
from grape_kernels.ops import reference_route_topk
from grape_kernels.ops.cpu_native import native_ops, python_loop_only
from grape_kernels.routing import RoutingSpec, kernel_spec

H, I = 32, 24
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
# Every registered backend that runs on the CPU natively (a new one joins these tests by registering),
# and the cpu backend's Python loop ("cpu-python") where its C++ loop (ops.cpu_native) took its place.
CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]
if "cpu" in CPU_BACKENDS and native_ops() is not None:
    CPU_BACKENDS.append("cpu-python")
TRITON_HERE = "triton" in available_backends("cpu")


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


Tensor = torch.Tensor


def oracle(hidden: Tensor, w_gate_up: Tensor, w_down: Tensor, ids: Tensor, weights: Tensor, *,
           gate_up_bias: Tensor | None = None, down_bias: Tensor | None = None, activation: str = "silu",
           alpha: float = 1.702, limit: float = 7.0, transposed: bool = False, interleaved: bool = False) -> Tensor:
    """float64 routed-experts output, one expert at a time."""
    d = torch.float64
    x = hidden.to(d)
    out = torch.zeros(x.shape, dtype=d)
    for e in range(w_gate_up.shape[0]):
        rows, slots = (ids == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        w1 = w_gate_up[e].to(d) if transposed else w_gate_up[e].to(d).T
        w2 = w_down[e].to(d) if transposed else w_down[e].to(d).T
        gu = x[rows] @ w1
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[e].to(d)
        if interleaved:
            gate, up = gu[:, 0::2], gu[:, 1::2]
        else:
            gate, up = gu[:, : w1.shape[1] // 2], gu[:, w1.shape[1] // 2 :]
        if activation == "silu":
            h = gate / (1 + torch.exp(-gate)) * up
        else:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            h = (up + 1) * gate / (1 + torch.exp(-alpha * gate))
        y = h @ w2
        if down_bias is not None:
            y = y + down_bias[e].to(d)
        out.index_add_(0, rows, weights[rows, slots].to(d).unsqueeze(1) * y)
    return out


def make_case(experts: int, top_k: int, tokens: int, dtype: torch.dtype, *, skew: str | None = None,
              seed: int = 0, gpt_oss: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, dict]:
    """Random layer + routing; ``skew``: 'one' (all tokens to one expert), 'subset', 'zipf'."""
    g = _gen(experts, top_k, tokens, str(dtype), skew, seed, gpt_oss)
    scale = 0.5
    if gpt_oss:
        w_gate_up = torch.randn(experts, H, 2 * I, generator=g) * scale
        w_down = torch.randn(experts, I, H, generator=g) * scale
    else:
        w_gate_up = torch.randn(experts, 2 * I, H, generator=g) * scale
        w_down = torch.randn(experts, H, I, generator=g) * scale
    hidden = torch.randn(tokens, H, generator=g)
    logits = torch.randn(tokens, experts, generator=g)
    if skew == "one":
        logits[:, experts - 1] += 100.0
        logits[:, : experts // 2] -= 100.0
    elif skew == "subset":
        logits[:, : experts // 2] -= 100.0
    elif skew == "zipf":
        logits += torch.log(1.0 / torch.arange(1, experts + 1, dtype=torch.float32)) * 4
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    biases = {}
    if gpt_oss:
        biases = dict(gate_up_bias=torch.randn(experts, 2 * I, generator=g).to(dtype),
                      down_bias=torch.randn(experts, H, generator=g).to(dtype))
    return hidden.to(dtype), w_gate_up.to(dtype), w_down.to(dtype), ids, weights, biases


def check(out: Tensor, ref: Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == dtype
    scale = ref.abs().max().item() if ref.numel() else 1.0
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= TOL[dtype] * max(scale, 1.0), f"max error {err:.3g} vs scale {scale:.3g}"


def run(backend: str, hidden: Tensor, w_gate_up: Tensor, w_down: Tensor, ids: Tensor, weights: Tensor,
        **layout) -> Tensor:
    """``backend`` on one layer; ``layout`` holds the other :class:`ExpertWeights` fields."""
    call = get_backend(backend.removesuffix("-python")).load()
    with torch.no_grad(), (python_loop_only() if backend == "cpu-python" else contextlib.nullcontext()):
        return call(hidden, ExpertWeights(w_gate_up, w_down, **layout), ids, weights)


GRID = [(e, k) for e in (1, 2, 3, 5, 8, 13, 64) for k in (1, 2, 4, 8) if k <= e]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [0, 1, 7, 300])
@pytest.mark.parametrize("experts,top_k", GRID)
def test_backend_matches_oracle(backend, experts, top_k, tokens, dtype):
    hidden, w1, w2, ids, weights, _ = make_case(experts, top_k, tokens, dtype)
    out = run(backend, hidden, w1, w2, ids, weights)
    check(out, oracle(hidden, w1, w2, ids, weights), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("skew", ["one", "subset", "zipf"])
def test_skewed_routing_and_idle_experts(backend, skew, dtype):
    hidden, w1, w2, ids, weights, _ = make_case(13, 2, 300, dtype, skew=skew)
    idle = 13 - ids.unique().numel()
    assert skew == "zipf" or idle > 0, "case must leave experts without tokens"
    check(run(backend, hidden, w1, w2, ids, weights), oracle(hidden, w1, w2, ids, weights), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_non_contiguous_inputs(backend, tokens):
    hidden, w1, w2, ids, weights, _ = make_case(8, 2, tokens, torch.float32)
    wide = torch.zeros(tokens, 2 * H)
    wide[:, ::2] = hidden
    strided_hidden = wide[:, ::2]
    w1_every_other = torch.stack([w1, torch.zeros_like(w1)], dim=1).flatten(0, 1)[::2]
    w2_transposed_storage = w2.transpose(1, 2).contiguous().transpose(1, 2)
    ids_t, weights_t = ids.t().contiguous().t(), weights.t().contiguous().t()
    assert not (strided_hidden.is_contiguous() or w1_every_other.is_contiguous())
    assert tokens == 1 or not ids_t.is_contiguous()
    out = run(backend, strided_hidden, w1_every_other, w2_transposed_storage, ids_t, weights_t)
    check(out, oracle(hidden, w1, w2, ids, weights), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_gpt_oss_layout(backend, tokens, dtype):
    """Transposed (E, H, 2I) storage, interleaved gate/up, biases, clamped SwiGLU that clamps."""
    hidden, w1, w2, ids, weights, biases = make_case(8, 4, tokens, dtype, gpt_oss=True)
    flags = dict(activation="gpt_oss", swiglu_alpha=1.702, swiglu_limit=1.5, transposed=True, interleaved=True)
    out = run(backend, hidden, w1, w2, ids, weights, **biases, **flags)
    ref = oracle(hidden, w1, w2, ids, weights, **biases, activation="gpt_oss", alpha=1.702, limit=1.5,
                 transposed=True, interleaved=True)
    check(out, ref, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation,interleaved", [("gpt_oss", False), ("silu", True)])
def test_other_flag_combinations(backend, activation, interleaved):
    hidden, w1, w2, ids, weights, _ = make_case(5, 2, 7, torch.float32)
    out = run(backend, hidden, w1, w2, ids, weights, activation=activation, swiglu_limit=1.0, interleaved=interleaved)
    ref = oracle(hidden, w1, w2, ids, weights, activation=activation, limit=1.0, interleaved=interleaved)
    check(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gpt_oss", [False, True], ids=["mixtral", "gpt_oss"])
@pytest.mark.parametrize("packing", ["plain", "packed"])
def test_cpu_backend_large_weights_take_every_gemm_formulation(dtype, gpt_oss, packing, monkeypatch):
    """Weights past the size thresholds, experts receiving 1, 2-3 and >= 4 rows: every GEMM
    formulation of the CPU path meets the oracle, on the plain weights (oneDNN, weight-major,
    ATen GEMV, mm; packing disabled) and on the packed copies (``ops.cpu_prepack``)."""
    from grape_kernels.ops import cpu as cpu_ops
    from grape_kernels.ops import cpu_prepack

    monkeypatch.setenv("GRAPE_CPU_PREPACK_GB", "0" if packing == "plain" else "1")
    cpu_prepack.release_prepacked()

    g = _gen("large", str(dtype), gpt_oss)
    hidden_size, inter, experts = 512, 2048, 4
    shapes = ((experts, hidden_size, 2 * inter), (experts, inter, hidden_size)) if gpt_oss else (
        (experts, 2 * inter, hidden_size), (experts, hidden_size, inter))
    w1, w2 = (torch.randn(shape, generator=g).mul(0.05).to(dtype) for shape in shapes)
    assert w1[0].numel() >= cpu_ops._ONEDNN_MIN_WEIGHT and w2[0].numel() >= cpu_ops._LOOP_MIN_WEIGHT
    hidden = torch.randn(8, hidden_size, generator=g).to(dtype)
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1], [0, 2], [0, 2], [2, 3], [0, 1]])
    weights = torch.rand(8, 2, generator=g)
    kinds = {cpu_ops._formulation(hidden, w, rows, gpt_oss) for w in (w1, w2) for rows in (1, 3, 7)}
    expected = {
        (torch.float32, False): {"mm", "weight_major", "onednn"},
        (torch.bfloat16, False): {"mm", "aten_gemv"},
        (torch.float32, True): {"mm", "onednn"},
        (torch.bfloat16, True): {"mm"},
    }[dtype, gpt_oss]
    assert cpu_ops._onednn_linear() is None or kinds == expected
    flags, biases = {}, {}
    if gpt_oss:
        flags = dict(activation="gpt_oss", swiglu_limit=1.5, transposed=True, interleaved=True)
        biases = dict(gate_up_bias=torch.randn(experts, 2 * inter, generator=g).to(dtype),
                      down_bias=torch.randn(experts, hidden_size, generator=g).to(dtype))
    out = run("cpu", hidden, w1, w2, ids, weights, **biases, **flags)
    ref = oracle(hidden, w1, w2, ids, weights, **biases, activation=flags.get("activation", "silu"), limit=1.5,
                 transposed=gpt_oss, interleaved=gpt_oss)
    check(out, ref, dtype)
    decode = run("cpu", hidden[:1], w1, w2, ids[:1], weights[:1], **biases, **flags)
    check(decode, ref[:1], dtype)
    assert (cpu_prepack.prepacked_bytes() > 0) == (packing == "packed" and cpu_prepack.onednn_packing())
    cpu_prepack.release_prepacked()


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_HERE, reason="Triton backend cannot run here (needs TRITON_INTERPRET=1 or CUDA)")
@pytest.mark.parametrize("experts,top_k,tokens", [(1, 1, 7), (5, 2, 0), (5, 2, 7), (13, 4, 1), (64, 8, 7)])
def test_triton_backend_matches_oracle(experts, top_k, tokens):
    hidden, w1, w2, ids, weights, _ = make_case(experts, top_k, tokens, torch.float32)
    check(run("triton", hidden, w1, w2, ids, weights), oracle(hidden, w1, w2, ids, weights), torch.float32)


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_HERE, reason="Triton backend cannot run here (needs TRITON_INTERPRET=1 or CUDA)")
def test_triton_backend_gpt_oss_layout():
    hidden, w1, w2, ids, weights, biases = make_case(8, 2, 7, torch.float32, gpt_oss=True)
    flags = dict(activation="gpt_oss", swiglu_limit=1.5, transposed=True, interleaved=True)
    out = run("triton", hidden, w1, w2, ids, weights, **biases, **flags)
    ref = oracle(hidden, w1, w2, ids, weights, **biases, activation="gpt_oss", limit=1.5, transposed=True,
                 interleaved=True)
    check(out, ref, torch.float32)


# ---- dispatch -------------------------------------------------------------------------------
def test_select_backend_by_device():
    cpu_choice = "vllm_cpu" if get_backend("vllm_cpu").usable(torch.device("cpu"))[0] else "cpu"
    assert select_backend("cpu") == cpu_choice
    assert select_backend(torch.device("cpu")) == cpu_choice
    assert select_backend("cuda") == ("triton" if get_backend("triton").usable(torch.device("cuda"))[0] else "dense")
    assert select_backend("meta") == "dense"
    assert {"cpu", "dense", "reference"} <= set(available_backends("cpu"))


def test_backend_status_says_why_a_backend_is_skipped(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    status = backend_status("meta")
    assert status["dense"] == (True, "") and status["reference"] == (True, "")
    assert status["cpu"] == (False, "runs on CPU tensors only")
    assert not status["triton"][0] and "CUDA" in status["triton"][1]
    routing = backend_status("cpu", kind="routing")
    assert routing["reference"][0] and not routing["cuda"][0] and "CUDA" in routing["cuda"][1]
    with pytest.raises(ValueError, match=r"'cpu' cannot run on meta .*\(runs on CPU tensors only\)"):
        resolve_backend("cpu", "meta")


def test_routing_backend_pairs_by_priority(monkeypatch):
    """Selection follows the records' priorities and pairings, so a new backend needs no new branch."""
    assert select_routing_backend("cpu", "cpu") is None and select_routing_backend("cpu", "dense") is None
    assert select_routing_backend("cpu", "reference") == "reference"
    expected = "triton" if TRITON_HERE else None
    assert select_routing_backend("cpu", "triton") == expected
    faster = Backend("fast_route", "routing", lambda: None, lambda d: (True, ""), {"*": 99},
                     pairs_with=("cpu", "vllm_cpu"))
    monkeypatch.setitem(backends_module._BACKENDS, ("routing", "fast_route"), faster)
    assert select_routing_backend("cpu", "auto") == "fast_route"
    assert "fast_route" in available_backends("cpu", kind="routing")
    with pytest.raises(ValueError, match="unknown routing backend 'nope'"):
        routing_function("nope")


def test_experts_forward_accepts_pair_weights_and_module():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=5, num_experts_per_tok=2)
    module = MixtralExperts(config)
    hidden, w1, w2, ids, weights, _ = make_case(5, 2, 7, torch.float32)
    with torch.no_grad():
        module.gate_up_proj.copy_(w1)
        module.down_proj.copy_(w2)
        ref = oracle(hidden, w1, w2, ids, weights)
        check(experts_forward(module, hidden, ids, weights), ref, torch.float32)
        check(experts_forward(ExpertWeights(w1, w2), hidden, ids, weights, backend="dense"), ref, torch.float32)
        check(experts_forward((w1, w2), hidden, ids, weights, backend="reference"), ref, torch.float32)
        with pytest.raises(TypeError, match="only apply to a"):
            experts_forward(module, hidden, ids, weights, transposed=True)


# ---- bad input --------------------------------------------------------------------------------
def _bad_calls() -> dict[str, tuple[tuple, dict, str]]:
    hidden, w1, w2, ids, weights, _ = make_case(5, 2, 7, torch.float32)
    return {
        "hidden width": ((hidden[:, :-1], w1, w2, ids, weights), {}, "hidden size|does not take"),
        "1-D hidden": ((hidden[0], w1, w2, ids, weights), {}, "2-D"),
        "w_down experts": ((hidden, w1, w2[:-1], ids, weights), {}, "w_down"),
        "w_down width": ((hidden, w1, w2[:, :, :-1], ids, weights), {}, "w_down"),
        "odd gate_up": ((hidden, w1[:, :-1], w2, ids, weights), {}, "2\\*I"),
        "dtype": ((hidden.bfloat16(), w1, w2, ids, weights), {}, "bfloat16|float32"),
        "device": ((hidden, w1.to("meta"), w2, ids, weights), {}, "meta"),
        "top_k > E": ((hidden, w1[:1], w2[:1], ids[:, :2] * 0, weights), {}, "top_k=2"),
        "ids rows": ((hidden, w1, w2, ids[:-1], weights[:-1]), {}, "rows|tokens"),
        "weights shape": ((hidden, w1, w2, ids, weights[:, :1]), {}, "topk_weights"),
        "float ids": ((hidden, w1, w2, ids.float(), weights), {}, "int32 or int64"),
        "id >= E": ((hidden, w1, w2, torch.where(ids == 0, 5, ids), weights), {}, r"\[0, 5\)"),
        "negative id": ((hidden, w1, w2, torch.where(ids == 0, -1, ids), weights), {}, r"\[0, 5\)"),
        "bias shape": ((hidden, w1, w2, ids, weights), {"down_bias": torch.zeros(5, H + 1)}, "down_bias"),
        "bias dtype": ((hidden, w1, w2, ids, weights), {"down_bias": torch.zeros(5, H, dtype=torch.bfloat16)},
                       "down_bias"),
        "activation": ((hidden, w1, w2, ids, weights), {"activation": "gelu"}, "activation"),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_raise_clear_errors(backend, case):
    args, kwargs, message = _bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        run(backend, *args, **kwargs)


def test_dispatch_errors():
    hidden, w1, w2, ids, weights, _ = make_case(5, 2, 7, torch.float32)
    with pytest.raises(ValueError, match="unknown experts backend 'fast'"):
        experts_forward((w1, w2), hidden, ids, weights, backend="fast")
    if not TRITON_HERE:
        with pytest.raises(ValueError, match="cannot run on cpu"):
            experts_forward((w1, w2), hidden, ids, weights, backend="triton")


def test_cpu_backend_refuses_autograd():
    hidden, w1, w2, ids, weights, _ = make_case(5, 2, 7, torch.float32)
    with pytest.raises(RuntimeError, match="inference-only"):
        get_backend("cpu").load()(hidden.requires_grad_(), ExpertWeights(w1, w2), ids, weights)


# ---- reference routing --------------------------------------------------------------------------
def _route_oracle(logits: Tensor, k: int, mode: str, renormalize: bool = False, scaling: float = 1.0,
                  bias: Tensor | None = None, n_group: int = 1, topk_group: int = 1) -> tuple[Tensor, Tensor]:
    """float64 routing, written independently of grape_kernels and grape_kernels.routing."""
    x = logits.double()
    if mode == "topk_softmax":
        top, ids = x.topk(k, dim=-1)
        return ids, top.softmax(-1) * scaling
    scores = x.softmax(-1) if mode == "softmax_topk" else x.sigmoid()
    choice = scores + (bias.double() if bias is not None else 0)
    if n_group > 1:
        per = x.shape[1] // n_group
        best = 2 if mode == "sigmoid_group" else 1  # DeepSeek-V3: best two; V2 (softmax): best one
        group_score = choice.view(-1, n_group, per).topk(best, dim=-1).values.sum(-1)
        drop = group_score.argsort(dim=-1, descending=True)[:, topk_group:]
        for row, groups in enumerate(drop.tolist()):
            for grp in groups:
                choice[row, grp * per : (grp + 1) * per] = float("-inf")
                if mode == "softmax_topk":
                    scores[row, grp * per : (grp + 1) * per] = 0.0
    ids = choice.topk(k, dim=-1).indices
    w = scores.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return ids, w * scaling


_ROUTING_CASES = [
    (mode, kwargs, experts, top_k)
    for mode, kwargs in [
        ("softmax_topk", {}),
        ("softmax_topk", {"renormalize": True, "scaling": 2.0}),
        ("topk_softmax", {}),
        ("sigmoid_group", {}),
    ]
    for experts, top_k in [(8, 2), (16, 4), (4, 4)]
] + [
    ("sigmoid_group", {"renormalize": True, "scaling": 2.5, "n_group": 4, "topk_group": 2}, experts, top_k)
    for experts, top_k in [(8, 2), (16, 4), (16, 8)]
] + [("softmax_topk", {"n_group": 4, "topk_group": 2}, experts, top_k) for experts, top_k in [(8, 2), (16, 6)]]


@pytest.mark.parametrize("mode,kwargs,experts,top_k", _ROUTING_CASES)
def test_reference_route_topk(mode, kwargs, experts, top_k):
    g = _gen(mode, experts, top_k)
    logits = torch.randn(50, experts, generator=g)
    if mode == "sigmoid_group":
        kwargs = {**kwargs, "correction_bias": torch.randn(experts, generator=g) * 0.1}
    ids, weights = reference_route_topk(logits, kernel_spec(mode, top_k, **kwargs))
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    renames = {"correction_bias": "bias"}
    ref_ids, ref_w = _route_oracle(logits, top_k, mode, **{renames.get(k, k): v for k, v in kwargs.items()})
    ids, order = ids.long().sort(dim=-1)
    ref_ids, ref_order = ref_ids.sort(dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights.gather(1, order).double(), ref_w.gather(1, ref_order), rtol=1e-5, atol=1e-6)


def test_reference_route_topk_rejects_bad_arguments():
    logits = torch.randn(3, 8)
    with pytest.raises(ValueError, match="score_fn"):
        reference_route_topk(logits, RoutingSpec(top_k=2, score_fn="relu"))
    with pytest.raises(ValueError, match="top_k=9"):
        reference_route_topk(logits, RoutingSpec(top_k=9))
    with pytest.raises(ValueError, match="groups scored by 'max'"):
        reference_route_topk(logits, RoutingSpec(top_k=2, n_group=2, group_score="top2_sum"))
    with pytest.raises(ValueError, match="exceeds n_group"):
        reference_route_topk(logits, kernel_spec("sigmoid_group", 5, n_group=4, topk_group=5))
