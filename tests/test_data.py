"""Tests of grape.data: loading texts, the token stream, calibration windows."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from grape.data import (
    CalibrationDataError,
    build_calibration_ids,
    load_texts,
    tokenize_documents,
)

SHARED_MODEL = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "mixtral-8x-pydoc"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route every token to a few experts.",
    "Pruning removes experts that the router rarely chooses.",
    "def f(x):\n    return x * 2\n",
]


@pytest.fixture(scope="module")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences, so tests need nothing from disk."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


# ---- load_texts -----------------------------------------------------------------------------


def test_load_single_txt(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_texts(path) == ["héllo\nworld\n"]
    assert load_texts(str(path)) == ["héllo\nworld\n"]


def test_load_folder_recursive_sorted_skips_empty(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("third")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "c.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("not a txt file")
    # relative-path order: a.txt < b.txt < b/z.txt < c.txt (empty, dropped)
    assert load_texts(tmp_path) == ["first", "second", "third"]


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_texts(path) == ["one", "two"]


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"content": "x"}', "line 2: expected a JSON object with a string 'text'"),
        ('["text"]', "line 2: expected a JSON object"),
        ('{"text": 3}', "line 2: expected a JSON object with a string 'text'"),
    ],
)
def test_load_jsonl_bad_line_names_line(tmp_path: Path, second_line: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n' + second_line + "\n")
    with pytest.raises(CalibrationDataError, match=message):
        load_texts(path)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match="no such file or folder"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(CalibrationDataError, match="no such file or folder"):
        load_texts("./relative/missing")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CalibrationDataError, match="is empty"):
        load_texts(tmp_path / "empty.txt")
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    with pytest.raises(CalibrationDataError, match="contains no .txt files"):
        load_texts(empty_dir)
    (empty_dir / "x.txt").write_text("\n")
    with pytest.raises(CalibrationDataError, match="all 1 .txt files .* are empty"):
        load_texts(empty_dir)
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(CalibrationDataError, match="unsupported file type '.csv'"):
        load_texts(tmp_path / "data.csv")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CalibrationDataError, match="not valid UTF-8"):
        load_texts(tmp_path / "bin.txt")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(CalibrationDataError, match="no non-empty 'text'"):
        load_texts(tmp_path / "blank.jsonl")


def test_hub_name_without_datasets_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(CalibrationDataError, match=r"needs the 'datasets' package"):
        load_texts("wikitext:wikitext-2-raw-v1:test")


def _fake_datasets(monkeypatch, load_dataset) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


class _FakeDataset:
    def __init__(self, columns: dict[str, list[str]]) -> None:
        self._columns = columns
        self.column_names = list(columns)

    def __getitem__(self, key: str) -> list[str]:
        return self._columns[key]


def test_hub_dataset_spec_parsing(monkeypatch) -> None:
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return _FakeDataset({"text": ["a", "", "b"], "meta": ["x", "y", "z"]})

    _fake_datasets(monkeypatch, load_dataset)
    assert load_texts("org/corpus") == ["a", "b"]
    assert load_texts("wikitext:wikitext-2-raw-v1:test") == ["a", "b"]
    assert load_texts("org/corpus::validation") == ["a", "b"]
    assert calls == [
        ("org/corpus", None, "train"),
        ("wikitext", "wikitext-2-raw-v1", "test"),
        ("org/corpus", None, "validation"),
    ]
    with pytest.raises(CalibrationDataError, match="'name:config:split'"):
        load_texts("name:config")


def test_hub_dataset_network_error_and_missing_column(monkeypatch) -> None:
    def offline(name, config, split):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(CalibrationDataError, match="network.*ConnectionError: Failed to resolve"):
        load_texts("org/corpus")

    _fake_datasets(monkeypatch, lambda name, config, split: _FakeDataset({"content": ["x"]}))
    with pytest.raises(CalibrationDataError, match=r"no 'text' column \(columns: \['content'\]\)"):
        load_texts("org/corpus")


# ---- token stream and calibration windows ---------------------------------------------------


def _reference_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[int]:
    """Documents encoded by the raw `tokenizers` object, EOS id between them."""
    eos = tokenizer.backend_tokenizer.token_to_id("<eos>")
    stream: list[int] = []
    for i, text in enumerate(texts):
        if i:
            stream.append(eos)
        stream.extend(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)
    return stream


def test_tokenize_documents_separates_with_eos(tiny_tokenizer) -> None:
    texts = ["hello world", "the lazy dog", "x"]
    stream = tokenize_documents(tiny_tokenizer, texts)
    assert stream.dtype == torch.long
    assert stream.tolist() == _reference_stream(tiny_tokenizer, texts)
    assert stream.tolist().count(tiny_tokenizer.eos_token_id) == 2
    with pytest.raises(CalibrationDataError, match="non-empty list"):
        tokenize_documents(tiny_tokenizer, "a string, not a list")


def test_calibration_windows_are_distinct_aligned_and_seeded(tiny_tokenizer) -> None:
    texts = SENTENCES * 6
    stream = torch.tensor(_reference_stream(tiny_tokenizer, texts))
    seq_len = 7
    windows = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)
    ids = build_calibration_ids(tiny_tokenizer, texts, num_samples=5, seq_len=seq_len, seed=3)
    assert ids.shape == (5, seq_len) and ids.dtype == torch.long
    # every row is one of the non-overlapping windows, and no window is used twice
    matches = [[i for i in range(windows.shape[0]) if torch.equal(windows[i], row)] for row in ids]
    chosen = {m[0] for m in matches}
    assert all(len(m) >= 1 for m in matches) and len(chosen) == 5
    assert torch.equal(ids, build_calibration_ids(tiny_tokenizer, texts, num_samples=5, seq_len=seq_len, seed=3))
    others = [build_calibration_ids(tiny_tokenizer, texts, num_samples=5, seq_len=seq_len, seed=s) for s in range(4)]
    assert any(not torch.equal(ids, other) for other in others)


def test_calibration_uses_every_window_when_exactly_enough(tiny_tokenizer) -> None:
    texts = SENTENCES
    n = len(_reference_stream(tiny_tokenizer, texts))
    ids = build_calibration_ids(tiny_tokenizer, texts, num_samples=n // 4, seq_len=4)
    stream = torch.tensor(_reference_stream(tiny_tokenizer, texts))[: (n // 4) * 4].view(-1, 4)
    assert sorted(map(tuple, ids.tolist())) == sorted(map(tuple, stream.tolist()))


def test_calibration_too_short_and_bad_arguments(tiny_tokenizer) -> None:
    n = len(_reference_stream(tiny_tokenizer, ["tiny text"]))
    with pytest.raises(CalibrationDataError, match=rf"has {n} tokens, but 3 samples of 16 tokens need 48"):
        build_calibration_ids(tiny_tokenizer, ["tiny text"], num_samples=3, seq_len=16)
    for kwargs, message in [
        ({"num_samples": 0, "seq_len": 4}, "num_samples must be an integer >= 1"),
        ({"num_samples": True, "seq_len": 4}, "num_samples must be an integer >= 1"),
        ({"num_samples": 1, "seq_len": 1}, "seq_len must be an integer >= 2"),
        ({"num_samples": 1, "seq_len": 4.0}, "seq_len must be an integer >= 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_calibration_ids(tiny_tokenizer, SENTENCES, **kwargs)


def test_calibration_from_shared_corpus() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED_MODEL)
    text = (SHARED_MODEL / "calib.txt").read_text(encoding="utf-8")[:20000]
    docs = [text[:10000], text[10000:]]
    ids = build_calibration_ids(tokenizer, docs, num_samples=4, seq_len=64, seed=0)
    assert ids.shape == (4, 64)
    assert 0 <= int(ids.min()) and int(ids.max()) < len(tokenizer)
    stream = tokenize_documents(tokenizer, docs)
    assert int((stream == tokenizer.eos_token_id).sum()) == 1 + sum(
        tokenizer(d, add_special_tokens=False)["input_ids"].count(tokenizer.eos_token_id) for d in docs
    )
