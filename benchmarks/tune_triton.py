"""Measure block sizes for grape's Triton MoE kernels on this GPU and write a tuning table.

    python benchmarks/tune_triton.py --hidden 2048 --intermediate 768 --experts 128 --top-k 8 \\
        --dtype bfloat16 --out tuning-h100.json
    export GRAPE_TRITON_TUNING=tuning-h100.json     # or grape_kernels.triton.tuning.set_table(...)

For each token count, every candidate config (BLOCK_M/N/K, GROUP_M, warps, stages that fit
the device's shared memory) times the whole ``fused_experts`` call (align, both grouped GEMMs,
reduction) with ``triton.testing.do_bench``, and the fastest is stored under the layer shape
``N=2*I,K=H`` and the tokens-per-expert bucket ``T*k/E`` rounded to a power of two. The
expert count only shapes the routing used while timing: tables never key on it, so one table
serves every layer of a pruned model whose layers keep different numbers of experts. Run it
once per distinct (H, I) of your model; results merge into an existing ``--out`` file.
It needs a CUDA GPU and refuses politely without one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def bucket_of(tokens: int, top_k: int, experts: int) -> float:
    """Tokens-per-expert rounded to a power of two (fractions allowed for decode with many experts)."""
    return 2.0 ** round(math.log2(tokens * top_k / experts))


def candidate_configs(tokens_per_expert: float, element_size: int, shared_budget: int, quick: bool) -> list:
    """Configs worth timing: tiles no taller than the rows an expert sees, fitting shared memory."""
    from grape_kernels.triton.tuning import KernelConfig

    tallest = max(16, 2 ** math.ceil(math.log2(max(tokens_per_expert, 1.0))))
    space = dict(
        block_m=[m for m in (16, 32, 64, 128) if m <= tallest],
        block_n=(64, 128) if quick else (32, 64, 128, 256),
        block_k=(64, 128) if quick else (32, 64, 128, 256),
        group_m=(1, 8),
        num_warps=(4, 8),
        num_stages=(3, 4) if quick else (2, 3, 4, 5),
    )
    configs = []
    for values in itertools.product(*space.values()):
        config = KernelConfig(*values)
        if config.num_warps == 8 and config.block_m * config.block_n < 64 * 128:
            continue  # too little work per warp to pay for 8 warps
        if config.shared_memory_bytes(element_size) <= shared_budget:
            configs.append(config)
    return configs


def merge_entry(table, n: int, k: int, bucket: float, config, device: str, note: str):
    """A copy of ``table`` with ``config`` stored for shape (N, K) and ``bucket``."""
    from grape_kernels.triton.tuning import TuningTable

    shapes = {key: dict(buckets) for key, buckets in table.shapes.items()}
    shapes.setdefault((n, k), {})[bucket] = config
    return TuningTable(table.default, shapes, device, note)


def _inputs(args: argparse.Namespace, tokens: int, dtype: torch.dtype) -> tuple:
    """(hidden, weights, topk_ids, topk_weights) of one random layer call on the GPU."""
    from grape_kernels import ExpertWeights

    experts, top_k, width, inter = args.experts, args.top_k, args.hidden, args.intermediate
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    transposed = args.layout == "gpt_oss"
    shape_gu = (experts, width, 2 * inter) if transposed else (experts, 2 * inter, width)
    shape_d = (experts, inter, width) if transposed else (experts, width, inter)
    weights = ExpertWeights(
        (torch.randn(shape_gu, device="cuda", generator=gen) / width**0.5).to(dtype),
        (torch.randn(shape_d, device="cuda", generator=gen) / inter**0.5).to(dtype),
        transposed=transposed,
    )
    if transposed:
        weights = weights._replace(
            gate_up_bias=torch.zeros(experts, 2 * inter, device="cuda", dtype=dtype),
            down_bias=torch.zeros(experts, width, device="cuda", dtype=dtype),
            activation="gpt_oss",
            interleaved=True,
        )
    hidden = torch.randn(tokens, width, device="cuda", generator=gen).to(dtype)
    topk_ids = torch.rand(tokens, experts, device="cuda", generator=gen).argsort(dim=1)[:, :top_k].int()
    return hidden, weights, topk_ids, torch.rand(tokens, top_k, device="cuda", generator=gen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, required=True, help="H, model width")
    parser.add_argument("--intermediate", type=int, required=True, help="I, one expert's gate (= up) width")
    parser.add_argument("--experts", type=int, default=64, help="E used to route while timing (not a table key)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--layout", choices=("standard", "gpt_oss"), default="standard")
    parser.add_argument("--out", type=Path, required=True, help="table to write (merged into if it exists)")
    parser.add_argument("--quick", action="store_true", help="a smaller search space")
    parser.add_argument("--rep", type=int, default=50, help="milliseconds of timing per candidate")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "tune_triton.py times kernels on a CUDA GPU, and torch sees none on this machine. "
            "Nothing was written; the shipped heuristic table stays in use.",
            file=sys.stderr,
        )
        return 1
    if args.top_k > args.experts:
        parser.error("--top-k must not exceed --experts")
    import triton
    import triton.testing
    from triton.errors import TritonError

    from grape_kernels.triton import fused_experts
    from grape_kernels.triton.tuning import DEFAULT_TABLE_PATH, TuningTable

    dtype = DTYPES[args.dtype]
    element_size = torch.empty((), dtype=dtype).element_size()
    device_name = torch.cuda.get_device_name()
    budget = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())["max_shared_mem"]
    table = TuningTable.load(args.out if args.out.exists() else DEFAULT_TABLE_PATH)
    n, k = 2 * args.intermediate, args.hidden
    note = f"measured by benchmarks/tune_triton.py ({args.dtype}, {args.layout} layout) on {device_name}"

    done = set()
    for tokens in sorted(args.tokens):
        bucket = bucket_of(tokens, args.top_k, args.experts)
        if bucket in done:
            continue
        done.add(bucket)
        inputs = _inputs(args, tokens, dtype)
        baseline = table.lookup(n, k, tokens * args.top_k / args.experts)
        timings = []
        for config in candidate_configs(bucket, element_size, budget, args.quick):
            try:
                ms = triton.testing.do_bench(lambda inputs=inputs, config=config: fused_experts(*inputs, config=config), rep=args.rep)
            except (TritonError, RuntimeError) as err:  # out of resources, ptxas failure, ...
                print(f"  skip {config}: {type(err).__name__}", file=sys.stderr)
                continue
            timings.append((ms, config))
        if not timings:
            print(f"T={tokens}: no candidate ran; keeping the table's entry", file=sys.stderr)
            continue
        best_ms, best = min(timings, key=lambda item: item[0])
        base_ms = triton.testing.do_bench(lambda inputs=inputs, baseline=baseline: fused_experts(*inputs, config=baseline), rep=args.rep)
        print(f"T={tokens:6d} bucket={bucket:g}: {best_ms:.4f} ms with {best} ({base_ms / best_ms:.2f}x the table's)")
        table = merge_entry(table, n, k, bucket, best, device_name, note)
        args.out.write_text(json.dumps(table.to_json(), indent=2) + "\n")  # keep partial progress
    print(f"wrote {args.out}; use it with GRAPE_TRITON_TUNING={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
