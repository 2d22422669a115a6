"""Peak memory of ``grape prune`` and ``grape sparsify`` against depth: 8 and 16 layers of the same width.

A pruning run holds one decoder layer at a time, so its peak resident memory must not grow with
the number of layers (target: at most +10 % from 8 to 16 layers). This script builds two
Mixtral models that differ only in depth (random weights, ``save_pretrained``, bf16), runs the
real command line on each in a fresh process, and reads the process's peak RSS from the kernel
(``os.wait4``'s ``ru_maxrss``). Each run is preceded by the same command with ``--dry-run
--json``, whose ``peak_rss_bytes`` prediction must be within 25 % of the measurement.

The models go into ``--work`` (outside the repository; about 2 GB at the default width) and are
reused by later runs; outputs are deleted after each run. Exit status 1 if a target is missed.

    python benchmarks/memory_depth.py --work /work/big/memory-depth
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPTH_TARGET = 1.10
PREDICTION_TARGET = 0.25


def build_model(directory: Path, layers: int, width: dict, tokenizer) -> Path:
    """A random bf16 Mixtral of ``layers`` layers, saved like a release (one tensor per expert)."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    if (directory / "config.json").is_file():
        return directory
    config = MixtralConfig(
        vocab_size=len(tokenizer), num_hidden_layers=layers, max_position_embeddings=1024, num_experts_per_tok=2,
        hidden_size=width["hidden"], intermediate_size=width["intermediate"], num_local_experts=width["experts"],
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(layers)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = directory.parent / f".{directory.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, directory)
    return directory


# The child reports its own high-water mark: a forked child's ru_maxrss starts at the parent's
# resident size (Linux carries the old mm's peak across exec), which would measure this script.
_CHILD = (
    "import atexit, sys\n"
    "def report():\n"
    "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
    "    open(sys.argv[1], 'w').write(str(int(line.split()[1]) * 1024))\n"
    "atexit.register(report)\n"
    "from grape.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def peak_rss_of(args: list[str], env: dict) -> tuple[int, float]:
    """Peak RSS (bytes, the process's VmHWM) and wall time of the grape command ``args`` in a fresh process."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "peak"
        done = subprocess.run([sys.executable, "-c", _CHILD, str(report), *args], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"grape {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return int(report.read_text()), time.perf_counter() - started


def dry_run(args: list[str], env: dict) -> dict:
    """The ``--dry-run --json`` plan of the same command."""
    done = subprocess.run([sys.executable, "-m", "grape.cli", *args, "--dry-run", "--json"], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"grape {' '.join(args)} --dry-run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the models, calibration text and cache")
    parser.add_argument("--layers", type=int, nargs=2, default=[8, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--no-predict", dest="predict", action="store_false", help="skip the dry-run predictions")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from grape.demo.corpus import write_corpus
    from grape.demo.model import train_tokenizer

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(work / "text")
    tokenizer = train_tokenizer([corpus.calib.read_text()], 4096)
    width = {"hidden": args.hidden, "intermediate": args.intermediate, "experts": args.experts}
    tag = f"h{args.hidden}-i{args.intermediate}-e{args.experts}"
    models = {n: build_model(work / f"mixtral-{tag}-{n}l", n, width, tokenizer) for n in args.layers}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRAPE_CACHE": str(work / "cache"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    calib = ["--calib", str(corpus.calib), "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len)]
    commands = {
        "prune": ["prune", "--method", "grape", "--experts-ratio", "0.25", "--no-cache", *calib],
        "sparsify": ["sparsify", "--method", "moe_pruner", "--sparsity", "0.5", *calib],
    }
    rows, failures = [], []
    for command, flags in commands.items():
        measured = {}
        for layers, model in models.items():
            out = work / f"out-{command}-{layers}"
            shutil.rmtree(out, ignore_errors=True)
            command_line = [flags[0], str(model), *flags[1:], "--out", str(out)]
            predicted = dry_run(command_line, env)["peak_rss_bytes"] if args.predict else float("nan")
            peak, seconds = peak_rss_of(command_line, env)
            shutil.rmtree(out, ignore_errors=True)
            measured[layers] = peak
            error = predicted / peak - 1
            rows.append((command, layers, peak, predicted, error, seconds))
            if abs(error) > PREDICTION_TARGET:
                failures.append(f"{command} {layers} layers: dry-run prediction off by {error:+.1%}")
        shallow, deep = (measured[n] for n in args.layers)
        if deep / shallow > DEPTH_TARGET:
            failures.append(f"{command}: peak RSS grew {deep / shallow - 1:+.1%} from {args.layers[0]} to {args.layers[1]} layers")
    print(f"width: hidden {args.hidden}, {args.experts} experts of {args.intermediate}, bf16; "
          f"calibration {args.calib_samples} x {args.seq_len} tokens")  # fmt: skip
    print("| command | layers | peak RSS (MiB) | dry-run prediction (MiB) | prediction error | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for command, layers, peak, predicted, error, seconds in rows:
        print(f"| {command} | {layers} | {peak / 2**20:.0f} | {predicted / 2**20:.0f} | {error:+.1%} | {seconds:.1f} |")
    for command in commands:
        peaks = [r[2] for r in rows if r[0] == command]
        print(f"{command}: {args.layers[1]} / {args.layers[0]} layers = {peaks[1] / peaks[0]:.3f} (target <= {DEPTH_TARGET})")
    for failure in failures:
        print(f"MISSED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
