"""``grape demo``: train a small MoE, prune it with GRAPE and the baselines, compare.

Every stage prints what it is doing:

1. corpus (:mod:`grape.demo.corpus`): ``train.txt``, ``calib.txt`` (an excerpt of it) and
   ``eval.txt`` in the work dir;
2. model (:mod:`grape.demo.model`): trained once and cached in ``<work_dir>/model``;
3. pruning (:mod:`grape.comparison`): GRAPE, every uniform baseline and
   ``global_soft_activation`` at 25% and 50% of all routed experts removed (calibration
   statistics are cached, so the twelve runs cost one calibration);
4. evaluation: held-out perplexity, parameters and bytes on disk of every model, a table of
   the original, GRAPE, the best uniform baseline and the global baseline at each budget,
   printed and written to ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from grape.comparison import Variant, measure, prune_and_measure, relative_perplexity
from grape.demo.corpus import write_corpus
from grape.demo.model import (
    DEMO_RECIPE,
    QUICK_RECIPE,
    TRAINING_MARKER,
    TrainRecipe,
    demo_threads,
    torch_threads,
    train_demo_model,
)
from grape.files import write_text_atomic
from grape.output_guard import check_disjoint

__all__ = ["RATIOS", "DEMO_METHODS", "run_demo"]

RATIOS = (0.25, 0.5)
UNIFORM_BASELINES = ("frequency", "soft_activation", "ean", "reap")
GLOBAL_BASELINE = "global_soft_activation"
DEMO_METHODS = ("grape", *UNIFORM_BASELINES, GLOBAL_BASELINE)


@dataclass(frozen=True)
class _Settings:
    """How much work the pruning and evaluation stages do (``quick`` shrinks it for tests)."""

    recipe: TrainRecipe
    calib_samples: int
    eval_tokens: int


_FULL = _Settings(DEMO_RECIPE, calib_samples=64, eval_tokens=65536)
_QUICK = _Settings(QUICK_RECIPE, calib_samples=8, eval_tokens=4096)


def _window_length(model_dir: Path, max_positions: int) -> int:
    """Tokens per calibration and evaluation window: the length the model was trained on when
    its ``training.json`` says (longer windows would measure extrapolation, not pruning), else
    512 capped by the model's context."""
    try:
        seq = json.loads((model_dir / TRAINING_MARKER).read_text(encoding="utf-8"))["seq"]
    except (OSError, ValueError, KeyError, TypeError):
        seq = 512
    return int(min(seq, max_positions))


def _external_model(model_dir: Path, work: Path) -> tuple[Path, dict[str, Path], dict | None]:
    """Calibration file, evaluation files and training record for a model given by the user.

    The shared test models ship ``calib.txt`` (training split) and ``eval_docs.txt`` /
    ``eval_code.txt`` (held out); those are the right data for that model. Whatever is missing
    falls back to the stdlib corpus, which is held-out text for any model not trained on it.
    """
    calib = model_dir / "calib.txt"
    candidates = {name: model_dir / f"eval_{name}.txt" for name in ("docs", "code")}
    eval_sets = {name: path for name, path in candidates.items() if path.is_file()}
    if not calib.is_file() or not eval_sets:
        corpus = write_corpus(work)
        calib = calib if calib.is_file() else corpus.calib
        eval_sets = eval_sets or {"eval": corpus.eval}
    try:
        training = json.loads((model_dir / TRAINING_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        training = None
    return calib, eval_sets, training


def _table_row(label: str, result: dict, original: dict) -> dict:
    row = {
        "model": label,
        "experts": f"{result['experts']}/{original['experts']}",
        "params (M)": result["parameters"] / 1e6,
        "disk (MB)": result["file_bytes"] / 1e6,
    }
    row.update({f"ppl {name}": p for name, p in result["perplexity"].items()})
    # a percentage rather than a ratio: "1" and "1.0003" print alike at table precision
    row["ppl change %"] = 100.0 * (relative_perplexity(result, original) - 1.0)
    return row


def _summary_rows(original: dict, pruned: dict[tuple[str, float], dict]) -> list[dict]:
    """Original; then per budget GRAPE, the best uniform baseline (by perplexity) and the
    global baseline."""
    rows = [_table_row("original", original, original)]
    for ratio in RATIOS:
        pct = f"{ratio:.0%}"
        best = min(UNIFORM_BASELINES, key=lambda m: relative_perplexity(pruned[m, ratio], original))
        rows.append(_table_row(f"grape @{pct}", pruned["grape", ratio], original))
        rows.append(_table_row(f"{best} @{pct} (best uniform)", pruned[best, ratio], original))
        rows.append(_table_row(f"{GLOBAL_BASELINE} @{pct}", pruned[GLOBAL_BASELINE, ratio], original))
    return rows


def _describe_training(training: dict | None) -> str:
    """"800 steps, final loss 3.421" from a training record (ours or a shared model's)."""
    if not training or "steps" not in training:
        return "no training record"
    loss_log = training.get("loss_log") or []
    final = f", final loss {loss_log[-1][1]:.3f}" if loss_log else ""
    return f"{training['steps']} steps{final}"


def _results_markdown(model_label: str, setup: str, summary: str, everything: str) -> str:
    return (
        f"# grape demo: `{model_label}`\n\n{setup}\n\n## Before and after\n\n{summary}\n\n"
        f"## Every method\n\n{everything}\n"
    )


def run_demo(work_dir: str | os.PathLike[str], quick: bool = False, model: str | None = None) -> dict:
    """Train (or take) a small MoE, prune it with GRAPE and the baselines, and compare.

    Args:
        work_dir: where the corpus, the trained model (``model/``, reused on later runs), the
            pruned checkpoints (``pruned/<method>-<percent>``) and ``results.md`` /
            ``results.json`` go.
        quick: a few training steps, few calibration samples and a short evaluation; for
            tests, where only the mechanics matter.
        model: an existing model directory to prune instead of training one (its
            ``calib.txt``/``eval_docs.txt``/``eval_code.txt`` are used when present).

    Returns:
        What ``results.json`` holds: the summary rows, every model's measurements, the
        training record and settings, and the wall time.

    Raises:
        FileNotFoundError: ``model`` is not a model directory.
        ImportError: a method the demo compares is not registered.
    """
    from grape.checkpoint_files import load_config
    from grape.methods import available_methods
    from grape.model_io import load_tokenizer
    from grape.report import format_table, write_json_atomic

    started = time.perf_counter()
    settings = _QUICK if quick else _FULL
    work = Path(work_dir)
    if model is not None:
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"{model} is not a model directory (no config.json)")
        # the demo writes corpus files and results into the work dir, never into the model
        check_disjoint(work / "results.json", {"model given with --model": model})
    work.mkdir(parents=True, exist_ok=True)
    missing = [m for m in DEMO_METHODS if m not in available_methods()]
    if missing:
        raise ImportError(f"pruning method(s) {missing} are not registered in grape.methods")

    with torch_threads(demo_threads()):
        if model is None:
            corpus = write_corpus(work)
            model_dir = work / "model"
            training = train_demo_model(corpus.train, model_dir, settings.recipe)
            calib, eval_sets = corpus.calib, {"eval": corpus.eval}
        else:
            model_dir = Path(model)
            calib, eval_sets, training = _external_model(model_dir, work)
        t_model = time.perf_counter()
        seq_len = _window_length(model_dir, load_config(model_dir).max_position_embeddings)
        tokenizer = load_tokenizer(model_dir)
        print(f"evaluating the original model on {', '.join(map(str, eval_sets.values()))}", flush=True)
        original = measure(model_dir, tokenizer, eval_sets, seq_len=seq_len, max_tokens=settings.eval_tokens)
        pruned = prune_and_measure(
            model_dir, [Variant(m) for m in DEMO_METHODS], RATIOS, out_dir=work / "pruned", calib=calib,
            calib_samples=settings.calib_samples, seq_len=seq_len, tokenizer=tokenizer, eval_sets=eval_sets,
            eval_seq_len=seq_len, max_tokens=settings.eval_tokens, log=lambda line: print(line, flush=True),
        )  # fmt: skip

    summary_rows = _summary_rows(original, pruned)
    all_rows = [_table_row("original", original, original)] + [
        _table_row(f"{method} @{ratio:.0%}", result, original)
        for (method, ratio), result in pruned.items()
    ]
    columns = list(summary_rows[0])
    summary = format_table(summary_rows, columns)
    wall = time.perf_counter() - started
    budgets = " and ".join(f"{r:.0%}" for r in RATIOS)
    held_out = ", ".join(f"{k}: `{v}`" for k, v in eval_sets.items())
    setup = (
        f"Model `{model_dir}` ({_describe_training(training)}). Calibration: "
        f"{settings.calib_samples} windows of {seq_len} tokens from `{calib}`. Perplexity: up to "
        f"{settings.eval_tokens} tokens of each held-out set ({held_out}), windows of {seq_len}. "
        f"Experts removed: {budgets} of all routed experts. Wall time {wall:.0f}s "
        f"({t_model - started:.0f}s for the model)."
    )
    results = {
        "model": str(model_dir),
        "quick": quick,
        "training": training,
        "calibration": {"source": str(calib), "samples": settings.calib_samples, "seq_len": seq_len},
        "eval_sets": {k: str(v) for k, v in eval_sets.items()},
        "eval_max_tokens": settings.eval_tokens,
        "summary": summary_rows,
        "original": original,
        "pruned": {f"{method}@{ratio}": result for (method, ratio), result in pruned.items()},
        "wall_seconds": round(wall, 1),
    }
    write_json_atomic(results, work / "results.json")
    markdown = _results_markdown(str(model_dir), setup, summary, format_table(all_rows, columns))
    write_text_atomic(work / "results.md", markdown)
    print(f"\n{summary}\n\n{setup}\nwrote {work / 'results.md'} and {work / 'results.json'}", flush=True)
    return results
