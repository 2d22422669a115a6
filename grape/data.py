"""Text input for calibration and evaluation: loading documents and cutting token windows.

Calibration and perplexity both need the same thing: a list of documents turned into one long
token stream with the EOS token between documents (so no window silently glues the end of one
file onto the start of another without the separator the model saw in training). This module
owns that stream and the seeded choice of calibration windows, so that calibration and
evaluation can never tokenise text differently.

Every bad input (missing path, empty files, malformed JSON lines, too little text) raises
:class:`CalibrationDataError` *before* any model work starts, naming what is wrong and where.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from grape.errors import InputError

__all__ = [
    "CalibrationDataError",
    "load_texts",
    "tokenize_documents",
    "build_calibration_ids",
]

_LOCAL_SUFFIXES = (".txt", ".jsonl")


class CalibrationDataError(InputError):
    """Calibration or evaluation text is missing, empty, malformed or too short."""


def load_texts(source: str | os.PathLike[str]) -> list[str]:
    """Documents from a local file or folder, or from a Hub dataset.

    Accepted sources, tried in this order:

    * an existing ``.txt`` file: one document;
    * an existing ``.jsonl`` file: one document per line, from each object's ``"text"`` field
      (blank lines are ignored; a line that is not JSON or has no string ``"text"`` is an error
      naming the line number);
    * an existing folder: every ``*.txt`` below it, recursively, in sorted relative-path order
      (so the token stream, hence the calibration windows, do not depend on the file system's
      listing order);
    * a string that is not a local path: a Hub dataset read with ``datasets`` as ``name``
      (split ``train``) or ``name:config:split`` (``config`` may be empty), ``"text"`` column.

    Empty documents are dropped: they add nothing but a separator token. Only when *nothing*
    is left is that an error, because an empty calibration set would otherwise surface much
    later as a confusing "too few tokens" or a division by zero.

    Raises:
        CalibrationDataError: missing path, unsupported file type, undecodable or empty
            file(s), malformed JSON lines, or a Hub dataset that cannot be loaded (``datasets``
            missing, no network, no such dataset or column).
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
        files = [f for f in files if f.is_file()]
        if not files:
            raise CalibrationDataError(f"folder {path} contains no .txt files")
        texts = [_read_text(f) for f in files]
        return _non_empty(texts, f"all {len(files)} .txt files under {path} are empty")
    if path.is_file():
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".txt":
            return _non_empty([_read_text(path)], f"file {path} is empty")
        raise CalibrationDataError(
            f"unsupported file type {path.suffix or '(no suffix)'!r} for {path}: "
            "use a .txt file, a .jsonl file with a 'text' field, or a folder of .txt files"
        )
    if _looks_local(str(source)):
        raise CalibrationDataError(f"no such file or folder: {path}")
    return _load_hub_dataset(str(source))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"{path} is not valid UTF-8 text: {exc}") from exc


def _non_empty(texts: list[str], message: str) -> list[str]:
    kept = [t for t in texts if t.strip()]
    if not kept:
        raise CalibrationDataError(message)
    return kept


def _read_jsonl(path: Path) -> list[str]:
    texts: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON may hold U+2028
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"{path} is not valid UTF-8 text: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationDataError(
                f"{path}, line {number}: not valid JSON ({exc.msg})"
            ) from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationDataError(
                f"{path}, line {number}: expected a JSON object with a string 'text' field"
            )
        texts.append(record["text"])
    return _non_empty(texts, f"{path} has no non-empty 'text' values")


def _looks_local(source: str) -> bool:
    """Whether a non-existent ``source`` was meant as a local path rather than a Hub name.

    Hub names look like ``org/name`` or ``name:config:split``; a file suffix, an absolute
    path or a leading ``.``/``~`` can only mean a local path, and deserves "no such file"
    rather than a network error.
    """
    return (
        source.endswith(_LOCAL_SUFFIXES)
        or os.path.isabs(source)
        or source.startswith((".", "~"))
    )


def _load_hub_dataset(source: str) -> list[str]:
    parts = source.split(":")
    if len(parts) == 1:
        name, config, split = parts[0], None, "train"
    elif len(parts) == 3:
        name, config, split = parts[0], parts[1] or None, parts[2] or "train"
    else:
        raise CalibrationDataError(
            f"{source!r} is not an existing file or folder, nor a Hub dataset spec "
            "('name' or 'name:config:split')"
        )
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as exc:
        raise CalibrationDataError(
            f"{source!r} is not an existing file or folder; loading it as a Hub dataset needs "
            "the 'datasets' package (pip install datasets)"
        ) from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, authentication and "not found" all surface differently
        raise CalibrationDataError(
            f"could not load Hub dataset {name!r} (config={config!r}, split={split!r}); "
            f"is the network available and the name right? {type(exc).__name__}: {exc}"
        ) from exc
    columns = list(getattr(dataset, "column_names", None) or [])
    if "text" not in columns:
        raise CalibrationDataError(
            f"Hub dataset {name!r} has no 'text' column (columns: {columns})"
        )
    return _non_empty(list(dataset["text"]), f"Hub dataset {name!r} has no non-empty 'text' values")


def tokenize_documents(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """One 1-D LongTensor of token ids: every document, EOS between consecutive documents.

    Documents are tokenised separately (no BOS/EOS added by the tokenizer) and joined with
    ``tokenizer.eos_token_id``: the separator is then exactly one EOS token whatever the
    tokenizer does with the EOS *string*, and a BPE merge can never span two documents.
    """
    if isinstance(texts, str) or not texts:
        raise CalibrationDataError("expected a non-empty list of documents (strings)")
    if len(texts) > 1 and tokenizer.eos_token_id is None:
        raise CalibrationDataError("the tokenizer has no EOS token to separate documents with")
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for index, ids in enumerate(encoded):
        if index:
            stream.append(int(tokenizer.eos_token_id))
        stream.extend(ids)
    return torch.tensor(stream, dtype=torch.long)


def _check_positive_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def build_calibration_ids(
    tokenizer,
    texts: Sequence[str],
    *,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
) -> torch.Tensor:
    """``num_samples`` calibration sequences of ``seq_len`` tokens, as a (num_samples, seq_len)
    LongTensor.

    The token stream (:func:`tokenize_documents`) is cut into non-overlapping windows of
    ``seq_len`` and ``num_samples`` distinct windows are drawn with a ``torch.Generator``
    seeded by ``seed``. Non-overlapping windows mean no token is counted twice in the
    statistics; drawing them at random (rather than taking the first ones) spreads the sample
    over the whole corpus; the seed makes the choice, and thus the cache key, reproducible.

    Raises:
        ValueError: num_samples < 1 or seq_len < 2.
        CalibrationDataError: the texts hold fewer than ``num_samples * seq_len`` tokens.
    """
    _check_positive_int("num_samples", num_samples, 1)
    _check_positive_int("seq_len", seq_len, 2)
    stream = tokenize_documents(tokenizer, texts)
    needed = num_samples * seq_len
    if stream.numel() < needed:
        raise CalibrationDataError(
            f"calibration text has {stream.numel()} tokens, but {num_samples} samples of "
            f"{seq_len} tokens need {needed}; give more text or lower num_samples/seq_len"
        )
    windows = stream[: (stream.numel() // seq_len) * seq_len].view(-1, seq_len)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows.shape[0], generator=generator)[:num_samples]
    return windows[chosen].clone()
