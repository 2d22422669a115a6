"""Held-out perplexity of every expert-pruning method at the same budgets, on one model.

Runs :func:`grape.comparison.prune_and_measure` (the real ``grape prune`` pipeline; calibration
is cached, so every method after the first costs only planning, surgery and evaluation), the
loop ``grape demo`` uses too, and writes a markdown table and a JSON file. A method is
``name[+merge][:key=value,...]`` (e.g. ``grape:entropy_floor=0.8``).

Example (the table in the README)::

    python benchmarks/prune_quality.py ../shared/models/mixtral-8x-pydoc \
        --calib ../shared/models/mixtral-8x-pydoc/calib.txt \
        --eval ../shared/models/mixtral-8x-pydoc/eval_docs.txt ../shared/models/mixtral-8x-pydoc/eval_code.txt \
        --ratios 0.25 0.5 --out benchmarks/results/prune_quality
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import torch

from grape.comparison import Variant, measure, prune_and_measure
from grape.methods import available_methods
from grape.model_io import load_tokenizer
from grape.report import format_table

DEFAULT_METHODS = [
    "random",
    "frequency",
    "soft_activation",
    "ean",
    "reap",
    "naee",
    "global_soft_activation",
    "grape",
    "grape+merge=average",
    "grape+merge",
]


def _cells(result: dict) -> dict:
    """A result's table cells: perplexity per evaluation set, and accuracy where measured."""
    cells = dict(result["perplexity"])
    cells.update({f"acc {name}": round(acc, 4) for name, acc in result.get("accuracy", {}).items()})
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", nargs="+", required=True)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accuracy", type=int, default=None, metavar="ITEMS",
                        help="also lm-eval accuracy of the next-line task of each --eval file, on ITEMS items")
    parser.add_argument("--out", default="benchmarks/results/prune_quality")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    variants = [Variant.parse(name) for name in args.methods]
    for variant in variants:
        if variant.method not in available_methods():
            raise SystemExit(f"unknown method {variant.method}")

    model = Path(args.model)
    tokenizer = load_tokenizer(model)
    eval_sets = {Path(f).stem: Path(f) for f in args.eval}
    base = measure(
        model, tokenizer, eval_sets, seq_len=args.eval_seq_len, max_tokens=args.max_eval_tokens,
        accuracy_items=args.accuracy,
    )  # fmt: skip
    rows = [{"budget": "0%", "method": "original", **_cells(base)}]
    with tempfile.TemporaryDirectory() as tmp:
        results = prune_and_measure(
            model, variants, args.ratios, out_dir=Path(tmp), calib=Path(args.calib), calib_samples=args.calib_samples,
            seq_len=args.seq_len, tokenizer=tokenizer, eval_sets=eval_sets, eval_seq_len=args.eval_seq_len,
            max_tokens=args.max_eval_tokens, seed=args.seed, accuracy_items=args.accuracy,
        )  # fmt: skip
    for (label, ratio), result in results.items():
        rows.append(
            {
                "budget": f"{ratio:.0%}",
                "method": label,
                **_cells(result),
                "experts/layer": " ".join(str(c) for c in result["experts_per_layer"] if c is not None),
                "prune s": result["prune_seconds"],
            }
        )
    accuracy = [f"acc {name}" for name in eval_sets] if args.accuracy else []
    columns = ["budget", "method", *eval_sets, *accuracy, "experts/layer", "prune s"]
    table = format_table(rows, columns)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out_dir / "table.md").write_text(table + f"\n\npeak RSS of the whole run: {peak_mb:.0f} MB\n")
    (out_dir / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
