"""Held-out perplexity of every expert-pruning method at the same budgets, on one model.

Runs the real pipeline (``grape.prune.prune``: calibration is cached, so every method after the
first costs only planning, surgery and evaluation), loads each pruned checkpoint back from
disk and measures perplexity on each evaluation file. Writes a markdown table and a JSON file.

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
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from grape.checkpoint import load_pruned
from grape.evaluation import evaluate_tasks, perplexity
from grape.methods import available_methods
from grape.prune import PruneOptions, prune
from grape.report import format_table
from grape.tasks import text_task_name

DEFAULT_METHODS = [
    "random",
    "frequency",
    "soft_activation",
    "ean",
    "reap",
    "naee",
    "global_soft_activation",
    "grape",
    "grape+merge",
]


def _method_spec(name: str) -> tuple[str, bool, dict]:
    """``method[+merge][:key=value,...]`` -> (method, merge, options); values parsed as JSON if they can be."""
    head, _, opts = name.partition(":")
    method, _, variant = head.partition("+")
    options = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return method, variant == "merge", options


def _evaluate(
    model_dir: Path, tokenizer, eval_files: list[str], seq_len: int, max_tokens: int | None, accuracy: int | None = None
) -> dict[str, float]:
    """Perplexity on each file and, with ``accuracy`` (a number of items), lm-eval accuracy
    (acc_norm) of grape's next-line task built from the same held-out file
    (``grape_next_line_<stem>``), on that many of its items (a random subset)."""
    model = load_pruned(model_dir, dtype=torch.float32).eval()
    row = {
        Path(f).stem: perplexity(model, tokenizer, f, seq_len=seq_len, max_tokens=max_tokens)["perplexity"]
        for f in eval_files
    }
    if accuracy:
        names = {text_task_name(f): Path(f).stem for f in eval_files}
        tasks = evaluate_tasks(
            model, tokenizer, list(names), batch_size=16, limit=accuracy, task_texts=eval_files
        )["results"]
        for name, stem in names.items():
            row[f"acc {stem}"] = round(tasks[name]["acc_norm,none"], 4)
            row[f"acc± {stem}"] = round(tasks[name]["acc_norm_stderr,none"], 4)
    return row


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
    for name in args.methods:
        if _method_spec(name)[0] not in available_methods():
            raise SystemExit(f"unknown method {name}")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = []
    base = _evaluate(Path(args.model), tokenizer, args.eval, args.eval_seq_len, args.max_eval_tokens, args.accuracy)
    rows.append({"budget": "0%", "method": "original", **base})
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            for name in args.methods:
                method, merge, options = _method_spec(name)
                out = Path(tmp) / f"{name}-{ratio}"
                started = time.perf_counter()
                prune(
                    args.model,
                    PruneOptions(
                        method=method,
                        merge=merge,
                        method_options=options,
                        out=str(out),
                        calib=args.calib,
                        experts_ratio=ratio,
                        calib_samples=args.calib_samples,
                        seq_len=args.seq_len,
                        seed=args.seed,
                    ),
                )
                report = json.loads((out / "grape_report.json").read_text())
                ppl = _evaluate(out, tokenizer, args.eval, args.eval_seq_len, args.max_eval_tokens, args.accuracy)
                rows.append(
                    {
                        "budget": f"{ratio:.0%}",
                        "method": name,
                        **ppl,
                        "experts/layer": " ".join(str(c) for c in report["experts_per_layer"] if c is not None),
                        "prune s": round(time.perf_counter() - started, 1),
                    }
                )
                print(format_table(rows[-1:], list(rows[-1])), flush=True)
    stems = [Path(f).stem for f in args.eval]
    accuracy = [f"acc {s}" for s in stems] if args.accuracy else []
    columns = ["budget", "method", *stems, *accuracy, "experts/layer", "prune s"]
    table = format_table(rows, columns)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out_dir / "table.md").write_text(table + f"\n\npeak RSS of the whole run: {peak_mb:.0f} MB\n")
    (out_dir / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
