"""Serving throughput and memory: vLLM against transformers ``generate``, pruned against unpruned.

Usage (in the serve environment, from the repository root)::

    $GRAPE_SERVE_VENV/bin/python benchmarks/serve_bench.py            # the model in ../shared
    $GRAPE_SERVE_VENV/bin/python benchmarks/serve_bench.py --unpruned MODEL --pruned PRUNED_DIR

Without ``--pruned`` the unpruned model is pruned by GRAPE at 50% into a temporary folder.
Each configuration (runner x model x dtype) runs in a fresh process, one at a time: the
runners are vLLM (``vllm.LLM`` with no grape flags: the plugin is an entry point) and
transformers ``generate`` with its eager experts and with grape's experts backend
(``experts_implementation="grape"``). A process loads the model, warms up, then generates
``--new-tokens`` tokens for every prompt of a batch of 1 and of 16 (fixed random 32-token
prompts, greedy, end-of-sequence ignored) and reports generated tokens per second. The parent
samples the peak resident memory of the process and its children (vLLM's engine core and
worker), and on a GPU the peak device memory in use. Rounds are interleaved (every
configuration once per round) and the median is reported; on a shared machine read the
numbers as ratios. The same script runs on a GPU machine: the device is chosen by
``torch.cuda.is_available()``; on the CPU vLLM runs with ``enforce_eager`` (no graph compilation).

Writes ``benchmarks/SERVE_RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

HERE = Path(__file__).resolve().parent
SHARED_MODEL = HERE.parents[1] / "shared" / "models" / "mixtral-8x-pydoc"
RUNNERS = ("vllm", "transformers-eager", "transformers-grape")
DTYPES = ("bfloat16", "float32")
BATCHES = (1, 16)
PROMPT_TOKENS = 32


def _prompts(vocab: int, batch: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(1, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(batch)]


def _measure_vllm(model: str, dtype: str, new_tokens: int) -> dict[int, float]:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype=dtype, max_model_len=PROMPT_TOKENS + new_tokens + 8, seed=0,
              enforce_eager=not torch.cuda.is_available())
    vocab = llm.get_tokenizer().vocab_size
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in _prompts(vocab, 2)], params, use_tqdm=False)
    rates = {}
    for batch in BATCHES:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in _prompts(vocab, batch)]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        rates[batch] = sum(len(o.outputs[0].token_ids) for o in outputs) / seconds
    llm.llm_engine.engine_core.shutdown()
    return rates


def _measure_transformers(model: str, dtype: str, new_tokens: int, experts: str) -> dict[int, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import grape_kernels  # noqa: F401  (registers experts_implementation="grape")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = AutoModelForCausalLM.from_pretrained(
        model, trust_remote_code=True, dtype=getattr(torch, dtype), experts_implementation=experts
    ).to(device).eval()
    vocab = AutoTokenizer.from_pretrained(model).vocab_size

    def generate(batch: int) -> int:
        ids = torch.tensor(_prompts(vocab, batch), device=device)
        with torch.no_grad():
            out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * batch

    generate(2)
    rates = {}
    for batch in BATCHES:
        start = time.perf_counter()
        tokens = generate(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        rates[batch] = tokens / (time.perf_counter() - start)
    return rates


def measure(runner: str, model: str, dtype: str, new_tokens: int) -> dict[int, float]:
    if runner == "vllm":
        return _measure_vllm(model, dtype, new_tokens)
    return _measure_transformers(model, dtype, new_tokens, "eager" if runner == "transformers-eager" else "grape")


def _gpu_memory_used_bytes() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out.split()[0]) * 2**20


def run_isolated(runner: str, model: Path, dtype: str, new_tokens: int) -> dict:
    """One configuration in a fresh process; peak memory sampled from outside."""
    import psutil

    command = [sys.executable, __file__, "--measure", runner, str(model), dtype, "--new-tokens", str(new_tokens)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = {"rss": 0, "gpu": 0}
    gpu_before = _gpu_memory_used_bytes()

    def sample() -> None:
        root = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                peak["rss"] = max(peak["rss"], sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            if gpu_before is not None:
                peak["gpu"] = max(peak["gpu"], (_gpu_memory_used_bytes() or 0) - gpu_before)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = child.communicate(timeout=1800)
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{runner} on {model} ({dtype}) failed with exit code {child.returncode}")
    rates = {int(k): v for k, v in json.loads(stdout.strip().splitlines()[-1]).items()}
    return {"rates": rates, "peak_rss": peak["rss"], "peak_gpu": peak["gpu"] if gpu_before is not None else None}


def _prune_shared(unpruned: Path, directory: Path) -> Path:
    out = directory / "grape50"
    subprocess.run([sys.executable, "-m", "grape.cli", "prune", str(unpruned), "--method", "grape",
                    "--experts-ratio", "0.5", "--calib", str(unpruned / "calib.txt"), "--out", str(out)], check=True)
    return out


def _table(results: dict, models: dict[str, Path], new_tokens: int) -> str:
    lines = [
        f"Generated tokens/s (median of rounds) and peak memory; {PROMPT_TOKENS}-token prompts, {new_tokens} new "
        "tokens each, greedy. Speed-up: tokens/s over transformers eager on the same model, dtype and batch.",
        "",
        "| model | dtype | runner | tok/s batch 1 | tok/s batch 16 | speed-up b1 | speed-up b16 | peak RSS (MiB) | peak GPU (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in models:
        for dtype in DTYPES:
            base = results[(name, dtype, "transformers-eager")]
            for runner in RUNNERS:
                r = results[(name, dtype, runner)]
                gpu = "-" if r["peak_gpu"] is None else f"{r['peak_gpu'] / 2**20:.0f}"
                lines.append(
                    f"| {name} | {dtype} | {runner} | {r['rates'][1]:.1f} | {r['rates'][16]:.1f} "
                    f"| {r['rates'][1] / base['rates'][1]:.2f}x | {r['rates'][16] / base['rates'][16]:.2f}x "
                    f"| {r['peak_rss'] / 2**20:.0f} | {gpu} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unpruned", type=Path, default=SHARED_MODEL)
    parser.add_argument("--pruned", type=Path, help="grape checkpoint of --unpruned (default: GRAPE 50%% now)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "SERVE_RESULTS.md")
    parser.add_argument("--measure", nargs=3, metavar=("RUNNER", "MODEL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        runner, model, dtype = args.measure
        print(json.dumps(measure(runner, model, dtype, args.new_tokens)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        pruned = args.pruned or _prune_shared(args.unpruned, Path(tmp))
        models = {"unpruned": args.unpruned, "pruned (GRAPE 50%)": pruned}
        samples: dict[tuple, list[dict]] = {}
        for round_index in range(args.rounds):
            for name, path in models.items():
                for dtype in DTYPES:
                    for runner in RUNNERS:
                        result = run_isolated(runner, path, dtype, args.new_tokens)
                        samples.setdefault((name, dtype, runner), []).append(result)
                        print(f"round {round_index + 1}: {name} {dtype} {runner}: {result['rates']}", flush=True)
        results = {
            key: {
                "rates": {b: statistics.median(s["rates"][b] for s in runs) for b in BATCHES},
                "peak_rss": max(s["peak_rss"] for s in runs),
                "peak_gpu": None if runs[0]["peak_gpu"] is None else max(s["peak_gpu"] for s in runs),
            }
            for key, runs in samples.items()
        }
        import torch
        import transformers
        import vllm

        machine = f"{platform.machine()}, {os.cpu_count()} cores" + (
            f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
        )
        text = (
            "# Serving: vLLM vs transformers, pruned vs unpruned\n\n"
            f"Written by `benchmarks/serve_bench.py` (rounds: {args.rounds}, interleaved). Machine: {machine}; "
            f"vLLM {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}. "
            f"Models: unpruned `{args.unpruned.name}`, pruned = GRAPE 50% of its experts. Peak RSS sums the "
            "process and its children (vLLM's engine core and worker; vLLM-CPU reserves "
            f"VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB of KV cache).\n\n"
            + _table(results, models, args.new_tokens) + "\n"
        )
        args.out.write_text(text)
        print(text)


if __name__ == "__main__":
    main()
