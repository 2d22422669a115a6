"""Prune one model with several methods at several budgets and measure every result.

The loop ``grape demo`` and ``benchmarks/prune_quality.py`` share: for each budget and each
method variant, run the real ``grape prune`` pipeline (calibration statistics are cached, so
every run after the first costs only planning, surgery and evaluation), load the checkpoint back
from disk and measure its size (from the headers) and held-out perplexity (float32).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grape.budget import Budget
from grape.checkpoint import load_pruned
from grape.evaluation import evaluate_tasks, perplexity
from grape.info import model_info
from grape.merge import MergeFit
from grape.prune import PruneOptions, prune

__all__ = ["Variant", "measure", "prune_and_measure", "relative_perplexity"]


@dataclass(frozen=True)
class Variant:
    """A method to compare: its name, drop or merge (and how merges are fitted), its own options."""

    method: str
    merge: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    merge_fit: str = MergeFit.kind

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """``method[+merge[=FIT]][:key=value,...]``; option values are JSON where they parse as JSON.

        ``FIT`` is a :class:`grape.merge.MergeFit` kind (``+merge=average``: the weight average).
        """
        head, _, items = spec.partition(":")
        method, _, variant = head.partition("+")
        variant, _, fit = variant.partition("=")
        options = {}
        for item in filter(None, items.split(",")):
            key, _, value = item.partition("=")
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value
        return cls(method, variant == "merge", options, fit or MergeFit.kind)

    @property
    def label(self) -> str:
        suffix = ":" + ",".join(f"{k}={v}" for k, v in self.options.items()) if self.options else ""
        fit = "" if self.merge_fit == MergeFit.kind else f"={self.merge_fit}"
        return f"{self.method}{'+merge' + fit if self.merge else ''}{suffix}"


def measure(
    path: Path,
    tokenizer,
    eval_sets: Mapping[str, Path],
    *,
    seq_len: int,
    max_tokens: int | None,
    accuracy_items: int | None = None,
) -> dict[str, Any]:
    """Size (from the checkpoint's headers) and held-out perplexity (float32) of one model.

    With ``accuracy_items``, also lm-eval accuracy (``acc_norm`` and its standard error) of
    grape's next-line task built from each evaluation file (``grape.tasks``), on that many of
    its items.
    """
    info = model_info(path)
    model = load_pruned(path, dtype=torch.float32).eval()
    ppl = {name: perplexity(model, tokenizer, source, seq_len=seq_len, max_tokens=max_tokens) for name, source in eval_sets.items()}
    accuracy = _next_line_accuracy(model, tokenizer, eval_sets, accuracy_items) if accuracy_items else {}
    return {
        **accuracy,
        "path": str(path),
        "experts": info["total_experts"],
        "experts_per_layer": [layer["experts"] for layer in info["layers"]],
        "parameters": info["parameters"],
        "file_bytes": info["file_bytes"],
        "perplexity": {name: r["perplexity"] for name, r in ppl.items()},
        "eval_tokens": {name: r["tokens"] for name, r in ppl.items()},
    }


def _next_line_accuracy(model, tokenizer, eval_sets: Mapping[str, Path], items: int) -> dict[str, Any]:
    from grape.tasks import text_task_name

    names = {text_task_name(source): name for name, source in eval_sets.items()}
    results = evaluate_tasks(
        model, tokenizer, list(names), batch_size=16, limit=items, task_texts=[str(s) for s in eval_sets.values()]
    )["results"]
    return {
        "accuracy": {name: results[task]["acc_norm,none"] for task, name in names.items()},
        "accuracy_stderr": {name: results[task]["acc_norm_stderr,none"] for task, name in names.items()},
    }


def relative_perplexity(result: Mapping[str, Any], original: Mapping[str, Any]) -> float:
    """Geometric mean over evaluation sets of perplexity / original perplexity (1.0 = no loss)."""
    logs = [math.log(p / original["perplexity"][name]) for name, p in result["perplexity"].items()]
    return math.exp(sum(logs) / len(logs))


def prune_and_measure(
    model: Path,
    variants: Sequence[Variant],
    ratios: Sequence[float],
    *,
    out_dir: Path,
    calib: Path,
    calib_samples: int,
    seq_len: int,
    tokenizer,
    eval_sets: Mapping[str, Path],
    eval_seq_len: int,
    max_tokens: int | None,
    seed: int = 0,
    accuracy_items: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[tuple[str, float], dict[str, Any]]:
    """Every variant at every budget ratio, pruned into ``out_dir/<label>-<percent>`` (replacing
    a previous run's output) and measured; keyed by (variant label, ratio)."""
    results = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for ratio in ratios:
        for variant in variants:
            out = out_dir / f"{variant.label}-{round(ratio * 100)}"
            log(f"pruning {ratio:.0%} of the experts with {variant.label}")
            started = time.perf_counter()
            prune(
                PruneOptions(
                    model=str(model), out=str(out), overwrite=True, seed=seed, calib=str(calib),
                    calib_samples=calib_samples, seq_len=seq_len, method=variant.method,
                    budget=Budget(ratio=ratio), merge=variant.merge, merge_fit=MergeFit(kind=variant.merge_fit),
                    method_options=dict(variant.options),
                )
            )  # fmt: skip
            seconds = time.perf_counter() - started
            results[variant.label, ratio] = measure(
                out, tokenizer, eval_sets, seq_len=eval_seq_len, max_tokens=max_tokens, accuracy_items=accuracy_items
            )
            results[variant.label, ratio]["prune_seconds"] = round(seconds, 1)
    return results
