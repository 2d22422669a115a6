"""Compile the Triton kernels ahead of time for an H100 (sm_90) without a GPU.

The interpreter checks what the kernels compute, but not that they compile: Triton's code
generator has rules the interpreter never enforces (types of loop-carried values, constexpr
use, layouts), and only the real compiler tells whether a config fits in shared memory. This
script drives the public launchers with CPU tensors while every ``JITFunction.run`` is
replaced by a stand-in that performs exactly the JIT's specialisation (same binder, same
argument packing) and then ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` down to a
cubin with the bundled ptxas. Nothing is launched. It prints one JSON line per compiled
kernel and exits non-zero if any compile fails or a kernel needs more shared memory than an
H100 block may use.

Run it in a process *without* ``TRITON_INTERPRET`` (the test does so in a subprocess)::

    python tests/kernels/triton_aot.py            # a representative subset (~1 minute)
    python tests/kernels/triton_aot.py --full     # every shipped config x dtype x variant
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_aot.py must run without TRITON_INTERPRET")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from grape_kernels.expert_weights import ExpertWeights  # noqa: E402
from grape_kernels.routing import kernel_spec  # noqa: E402
from grape_kernels.triton import align_block_size, fused_experts, route_topk  # noqa: E402
from grape_kernels.triton.tuning import DEFAULT_TABLE_PATH, TuningTable, fit_shared_memory  # noqa: E402

H100_SHARED_MEMORY = 232448  # bytes of shared memory one block may opt into on sm_90
TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
RESULTS: list[dict] = []
_SEEN: set[str] = set()


def _compile_instead_of_launch(self: JITFunction, *args, grid, warmup, **kwargs) -> None:
    """Stand-in for ``JITFunction.run``: specialise like the JIT, compile, record, return."""
    binder = create_function_from_signature(self.signature, self.params, BACKEND)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound_args, specialization, options)
    named = {self.arg_names[path[0]]: str(value) for path, value in constexprs.items()}
    record = {"kernel": self.fn.__name__, "constexprs": named, "signature": signature}
    key = json.dumps([record, {str(k): v for k, v in attrs.items()}, options.num_warps, options.num_stages])
    if key in _SEEN:
        return
    _SEEN.add(key)
    try:
        source = ASTSource(self, signature, constexprs, attrs)
        compiled = triton.compile(source, target=TARGET, options=options.__dict__)
    except Exception as err:  # report every failure, then fail at the end
        record.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000])
    else:
        shared = int(compiled.metadata.shared)
        ptx = compiled.asm["ptx"]
        record.update(
            ok=shared <= H100_SHARED_MEMORY,
            shared=shared,
            num_warps=compiled.metadata.num_warps,
            num_stages=options.num_stages,
            # evidence of the fast paths: async (pipelined) copies and Hopper tensor cores
            cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            wgmma=ptx.count("wgmma.mma_async"),
        )
    RESULTS.append(record)
    print(json.dumps({k: v for k, v in record.items() if k != "signature"}), flush=True)


def _experts_inputs(dtype: torch.dtype, transposed: bool, with_bias: bool) -> tuple:
    """(hidden, weights, topk_ids, topk_weights) of one layer call; values are never read."""
    tokens, experts, top_k, width, inter = 64, 8, 2, 256, 192
    shape_gu = (experts, width, 2 * inter) if transposed else (experts, 2 * inter, width)
    shape_d = (experts, inter, width) if transposed else (experts, width, inter)
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).to(torch.int32)
    weights = ExpertWeights(torch.empty(shape_gu, dtype=dtype), torch.empty(shape_d, dtype=dtype), transposed=transposed)
    if with_bias:
        weights = weights._replace(
            gate_up_bias=torch.empty((experts, 2 * inter), dtype=dtype),
            down_bias=torch.empty((experts, width), dtype=dtype),
            activation="gpt_oss",
            interleaved=True,
        )
    return torch.empty((tokens, width), dtype=dtype), weights, ids, torch.empty((tokens, top_k), dtype=torch.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every shipped config, dtype and variant")
    args = parser.parse_args(argv)
    JITFunction.run = _compile_instead_of_launch

    logits = torch.empty((5, 64), dtype=torch.bfloat16)
    route_topk(logits, kernel_spec("softmax_topk", 4, renormalize=True))
    route_topk(logits, kernel_spec("topk_softmax", 4))
    grouped = kernel_spec("sigmoid_group", 8, correction_bias=torch.empty(64), n_group=8, topk_group=4, renormalize=True)
    route_topk(logits, grouped)
    route_topk(logits, kernel_spec("softmax_topk", 6, n_group=8, topk_group=3))  # DeepSeek-V2 group-limited
    align_block_size(torch.zeros((5, 4), dtype=torch.int64), 64, 16)

    table = TuningTable.load(DEFAULT_TABLE_PATH)
    configs = [table.default[b] for b in sorted(table.default)]
    if args.full:
        plan = [(c, d, v) for c in configs for d in (torch.bfloat16, torch.float16, torch.float32) for v in (0, 1)]
    else:  # smallest and largest tile shapes, the GPT-OSS variant, and fp32's shrunken largest
        plan = [(configs[0], torch.bfloat16, 0), (configs[-1], torch.bfloat16, 1), (configs[-1], torch.float32, 0)]
    for config, dtype, variant in plan:
        fitted = fit_shared_memory(config, torch.empty((), dtype=dtype).element_size(), H100_SHARED_MEMORY)
        fused_experts(*_experts_inputs(dtype, transposed=bool(variant), with_bias=bool(variant)), config=fitted)

    failed = [r for r in RESULTS if not r["ok"]]
    print(json.dumps({"compiled": len(RESULTS), "failed": len(failed)}))
    return 1 if failed or not RESULTS else 0


if __name__ == "__main__":
    sys.exit(main())
