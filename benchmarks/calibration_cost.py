"""Calibration time as a ratio to a plain forward of the same model on the same tokens.

``grape prune`` calibrates every MoE layer (:func:`grape.calibration.collect.collect_layer_stats`,
the cache off) and the ratio says what the statistics cost on top of the forward they need
anyway. Both run in this one process, interleaved round by round (plain forward, then
calibration, then again), on the same token ids, batch size and dtype, so a machine shared with
other work slows both alike; the median of the per-round ratios is reported. The plain forward
is transformers' own ``from_pretrained`` model (fully loaded, ``inference_mode``); calibration
reads each layer's weights from disk, as a real run does.

Example (the README's numbers)::

    OMP_NUM_THREADS=1 python benchmarks/calibration_cost.py ../shared/models/mixtral-8x-pydoc --samples 16 --seq-len 512
    OMP_NUM_THREADS=1 python benchmarks/calibration_cost.py --tiny mixtral --samples 64 --seq-len 128 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from grape.calibration.collect import collect_layer_stats
from grape.model_io import LazyCausalLM


def _tiny_model(arch: str, directory: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import build_tiny_model

    return build_tiny_model(arch, directory, dtype=torch.bfloat16, hidden_size=128, intermediate_size=256, num_hidden_layers=4)


def _plain_forward(model, ids: torch.Tensor, batch_size: int) -> None:
    with torch.inference_mode():
        for batch in ids.split(batch_size):
            model(input_ids=batch, use_cache=False)


def measure(model_dir: Path, *, samples: int, seq_len: int, batch_size: int, sample_tokens: int, rounds: int) -> dict:
    from transformers import AutoModelForCausalLM

    lazy = LazyCausalLM.open(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=lazy.dtype).eval()
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    forward_s, calibration_s = [], []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(rounds):
            start = time.perf_counter()
            _plain_forward(model, ids, batch_size)
            forward_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            collect_layer_stats(
                lazy, ids, sample_tokens=sample_tokens, batch_size=batch_size, cache_dir=Path(cache), use_cache=False
            )
            calibration_s.append(time.perf_counter() - start)
    ratios = [c / f for c, f in zip(calibration_s, forward_s)]
    return {
        "model": str(model_dir), "tokens": ids.numel(), "dtype": str(lazy.dtype).removeprefix("torch."),
        "forward_s": statistics.median(forward_s), "calibration_s": statistics.median(calibration_s),
        "ratio": statistics.median(ratios), "ratios": [round(r, 2) for r in ratios],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="model directory (or use --tiny)")
    parser.add_argument("--tiny", help="build a tiny random model of this architecture (tests/tiny_models.py)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _tiny_model(args.tiny, Path(tmp) / "model") if args.tiny else Path(args.model)
        result = measure(
            model_dir, samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
            sample_tokens=args.sample_tokens, rounds=args.rounds,
        )  # fmt: skip
    if args.tiny:
        result["model"] = f"tiny {args.tiny} (bf16, hidden 128, 4 layers)"
    print(
        f"{result['model']}: {result['tokens']} tokens, {result['dtype']}: plain forward {result['forward_s']:.2f} s, "
        f"calibration {result['calibration_s']:.2f} s, ratio {result['ratio']:.2f}x (rounds: {result['ratios']})"
    )


if __name__ == "__main__":
    main()
