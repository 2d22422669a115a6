"""Prune ONE full-width DeepSeek-V3 MoE layer (FP8 release layout, ~11.7 GB) with ``grape prune``.

The proof that a layer larger than the memory budget calibrates: 256 routed experts are 22.5 GB
in bf16, and calibration reads them in groups that fit ``--max-memory``
(:func:`grape.calibration.memory_plan.experts_per_group`). The layer is built with
``benchmarks/deepseek_v3_layer.py`` (unless it exists), a tiny byte-level tokenizer and a
calibration text are added beside it, and the real CLI runs in a subprocess; the script prints
its wall time and peak RSS (``ru_maxrss`` of the child) and, with ``--delete``, removes the
checkpoint and the output afterwards. Not a CI test: it needs ~25 GB of disk and minutes.

Example (the README's numbers; check ``df -h`` and ``free -g`` first)::

    python benchmarks/deepseek_v3_prune.py /work/big/deepseek-v3 --max-memory 6GB --delete
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def _prepare(layer_dir: Path, vocab: int) -> None:
    if not layer_dir.exists():
        subprocess.run([sys.executable, str(_ROOT / "benchmarks" / "deepseek_v3_layer.py"), str(layer_dir), "--vocab", str(vocab)], check=True)
    sys.path.insert(0, str(_ROOT / "tests"))
    from tiny_models import save_tiny_tokenizer, write_calibration_text

    if not (layer_dir / "tokenizer.json").is_file():
        save_tiny_tokenizer(layer_dir)
    write_calibration_text(layer_dir.parent / f"{layer_dir.name}-calib.txt", repeats=200)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("layer_dir", type=Path, help="where the layer is (or is built); outside the repo")
    parser.add_argument("--max-memory", default="6GB")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sample-tokens", type=int, default=128)
    parser.add_argument("--experts-ratio", default="0.5")
    parser.add_argument("--delete", action="store_true", help="remove the layer, its calibration text and the output afterwards")
    args = parser.parse_args()
    layer_dir = args.layer_dir.resolve()
    out = layer_dir.parent / f"{layer_dir.name}-pruned"
    calib = layer_dir.parent / f"{layer_dir.name}-calib.txt"
    try:
        _prepare(layer_dir, vocab=4096)
        command = [
            sys.executable, "-m", "grape.cli", "prune", str(layer_dir), "--method", "grape",
            "--experts-ratio", args.experts_ratio, "--calib", str(calib), "--calib-samples", str(args.calib_samples),
            "--seq-len", str(args.seq_len), "--sample-tokens", str(args.sample_tokens),
            "--max-memory", args.max_memory, "--no-cache", "--out", str(out), "--overwrite",
        ]  # fmt: skip
        started = time.perf_counter()
        status = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(_ROOT)}).returncode
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child: the prune
        result = {"exit": status, "seconds": round(seconds), "peak_rss_gb": round(peak / 1e9, 2), "max_memory": args.max_memory}
        if status == 0:
            report = json.loads((out / "grape_report.json").read_text()) if (out / "grape_report.json").is_file() else {}
            result["timings"] = report.get("timings")
            result["output_gb"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9, 2)
        print(json.dumps(result, indent=2))
        return status
    finally:
        if args.delete:
            for path in (layer_dir, out):
                shutil.rmtree(path, ignore_errors=True)
            calib.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
