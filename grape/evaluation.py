"""Quality of a model before and after pruning: held-out perplexity and lm-eval tasks.

Perplexity is computed on non-overlapping windows (each token is predicted exactly once, with
at most ``seq_len - 1`` tokens of context) rather than a sliding window: it is what pruning
papers report, it is cheap enough for the CPU, and comparing two models on identical windows is
all a before/after comparison needs. Token losses are summed in float64 because the mean of
~10^5-10^6 float32 terms otherwise drifts in the 5th-6th digit, which is the size of the
differences small pruning budgets produce.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from grape.data import CalibrationDataError, load_texts, tokenize_documents

__all__ = ["EvalDependencyError", "perplexity", "evaluate_tasks"]


class EvalDependencyError(ImportError):
    """An optional evaluation dependency (lm-eval) is not installed."""


def _resolve_texts(text_or_path: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Documents from raw text, a list of documents, or a path understood by :func:`load_texts`.

    A string naming an existing file or folder is read from disk; a one-line string ending in
    ``.txt``/``.jsonl`` that does not exist is an error (a mistyped path must not be scored as
    the text "eval.txt"); any other string is the text itself.
    """
    if isinstance(text_or_path, os.PathLike):
        return load_texts(text_or_path)
    if isinstance(text_or_path, str):
        single_line = "\n" not in text_or_path and len(text_or_path) < 4096
        named_file = text_or_path.endswith((".txt", ".jsonl"))
        if single_line and (named_file or os.path.exists(text_or_path)):
            return load_texts(text_or_path)
        if not text_or_path.strip():
            raise CalibrationDataError("the evaluation text is empty")
        return [text_or_path]
    texts = list(text_or_path)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise CalibrationDataError(
            "expected evaluation text, a path, or a non-empty list of strings"
        )
    return texts


def perplexity(
    model: nn.Module,
    tokenizer,
    text_or_path: str | os.PathLike[str] | Sequence[str],
    *,
    seq_len: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Perplexity of a causal LM on a text, a file/folder (see :func:`grape.data.load_texts`)
    or a list of documents.

    The documents are tokenised into one stream with EOS between documents, truncated to
    ``max_tokens`` if given, and cut into non-overlapping windows of ``seq_len`` tokens; a last
    partial window is scored when it holds at least 2 tokens (one prediction). Within a window
    token ``t+1`` is predicted from tokens ``<= t``. The model is put in eval mode for the run
    and its previous mode restored afterwards.

    Returns:
        ``{"perplexity": exp(nll), "tokens": predicted tokens, "nll": mean token NLL (nats),
        "seq_len": seq_len}``.

    Raises:
        ValueError: bad ``seq_len`` / ``batch_size`` / ``max_tokens``, or ``seq_len`` beyond the
            model's ``max_position_embeddings``.
        CalibrationDataError: missing/empty input, or fewer than 2 tokens to score.
    """
    for name, value, minimum in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2
    ):
        raise ValueError(f"max_tokens must be None or an integer >= 2, got {max_tokens!r}")
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_positions}"
        )

    stream = tokenize_documents(tokenizer, _resolve_texts(text_or_path))
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if stream.numel() < 2:
        raise CalibrationDataError(
            f"the evaluation text has {stream.numel()} token(s); at least 2 are needed"
        )

    n_full = stream.numel() // seq_len
    full = stream[: n_full * seq_len].view(n_full, seq_len)
    tail = stream[n_full * seq_len :]
    batches = list(full.split(batch_size)) if n_full else []
    if tail.numel() >= 2:
        batches.append(tail.unsqueeze(0))

    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="perplexity", unit="batch", disable=None):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                token_nll = nn.functional.cross_entropy(
                    logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none"
                )
                total_nll += token_nll.double().sum().cpu()
                total_tokens += token_nll.numel()
    finally:
        model.train(was_training)

    nll = float(total_nll) / total_tokens
    return {"perplexity": math.exp(nll), "tokens": total_tokens, "nll": nll, "seq_len": seq_len}


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    batch_size: int,
    limit: int | float | None = None,
    task_paths: Sequence[str | os.PathLike[str]] = (),
    task_texts: Sequence[str | os.PathLike[str]] = (),
) -> dict:
    """Run lm-eval tasks on the in-memory model (no save/reload round trip).

    The model is wrapped in lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)``, so a
    pruned model with ragged expert counts is evaluated exactly as it sits in memory, by
    lm-eval's own ``simple_evaluate``.

    Task names resolve, in this order, to grape's local tasks (:mod:`grape.tasks`:
    ``grape_stdlib_next_line``, and ``grape_next_line_<stem>`` for each file in
    ``task_texts``), to YAML task folders in ``task_paths``, and to lm-eval's bundled tasks
    (which download their data, so they need the Hub). lm-eval's bundled index (thousands of
    YAML files) is only scanned when a name is not found locally.

    Returns:
        ``{"results": per-task metrics, "versions": task versions, "n-shot": shots per task}``
        from ``lm_eval.simple_evaluate`` (the parts that are JSON-serialisable and meaningful
        in a report; per-sample logs are not kept).

    Raises:
        ValueError: empty or non-string task list, a bad batch size / limit, a task folder that
            does not exist, or a task name found nowhere (the message lists the local ones).
        EvalDependencyError: lm-eval is not installed.
    """
    if not isinstance(tasks, (list, tuple)) or not tasks or not all(
        isinstance(t, str) and t.strip() for t in tasks
    ):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0
    ):
        raise ValueError(f"limit must be None or positive, got {limit!r}")
    for folder in task_paths:
        if not Path(folder).is_dir():
            raise ValueError(f"task folder {str(folder)!r} does not exist")
    try:
        lm_eval = importlib.import_module("lm_eval")
        huggingface = importlib.import_module("lm_eval.models.huggingface")
        manager_module = importlib.import_module("lm_eval.tasks")
    except ImportError as exc:
        raise EvalDependencyError(
            "task evaluation needs lm-eval, which is not installed; install it with "
            "`pip install grape-moe[eval]` (or `pip install 'lm-eval[hf]'`)"
        ) from exc

    from grape.tasks import STDLIB_TASK, local_task_dir

    with local_task_dir(tasks, task_texts) as (folder, local_names):
        include = [str(folder), *(str(p) for p in task_paths)]
        manager = manager_module.TaskManager(include_path=include, include_defaults=False)
        missing = set(tasks) - set(manager.all_tasks)
        # grape_* names are grape's own: one not built here is a typo, not a bundled task.
        if missing and not any(t.startswith("grape_") for t in missing):
            manager = manager_module.TaskManager(include_path=include)
        unknown = sorted(set(tasks) - set(manager.all_tasks))
        if unknown:
            local = ", ".join(sorted({STDLIB_TASK, *local_names}))
            raise ValueError(f"unknown task(s) {unknown}; grape's local tasks here: {local}")
        lm = huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), batch_size=batch_size, limit=limit, log_samples=False,
            task_manager=manager,
        )
    return {
        "results": results["results"],
        "versions": results.get("versions", {}),
        "n-shot": results.get("n-shot", {}),
    }
