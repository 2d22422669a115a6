"""The demo corpus: the stdlib split by file name, written once and left alone after."""

import pytest

from grape.demo.corpus import Corpus, is_held_out, split_sources, stdlib_sources, write_corpus


def test_split_is_decided_by_file_name_alone(tmp_path):
    files = stdlib_sources()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    train, held = split_sources(files)
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(files)
    assert 0.01 < len(held) / len(files) < 0.15  # ~5% of the files
    # SHA-256 of the name: the same answer on every machine and Python version.
    assert is_held_out("turtle.py") and is_held_out("statistics.py")
    assert not is_held_out("os.py") and not is_held_out("json.py")
    # Other folders holding files of the same names split the same way.
    copies = []
    for f in files:
        (tmp_path / f.name).write_text("x = 1\n")
        copies.append(tmp_path / f.name)
    train_copy, held_copy = split_sources(copies)
    assert [f.name for f in held_copy] == [f.name for f in held]
    assert stdlib_sources(tmp_path) == sorted(copies)


def test_split_needs_both_sides(tmp_path):
    only_train = [f for f in stdlib_sources() if not is_held_out(f.name)][:3]
    with pytest.raises(ValueError, match="at least one of each"):
        split_sources(only_train)
    with pytest.raises(FileNotFoundError, match="no \\*.py files"):
        stdlib_sources(tmp_path)


def test_write_corpus_splits_and_leaves_unchanged_files_alone(tmp_path, small_sources):
    corpus = write_corpus(tmp_path, small_sources)
    assert corpus == Corpus(tmp_path / "train.txt", tmp_path / "calib.txt", tmp_path / "eval.txt")
    held = [f for f in small_sources if is_held_out(f.name)]
    train = [f for f in small_sources if not is_held_out(f.name)]
    train_text, eval_text = corpus.train.read_text(), corpus.eval.read_text()
    assert eval_text == "\n\n".join(f.read_text() for f in held)
    assert train_text == "\n\n".join(f.read_text() for f in train)
    assert corpus.calib.read_text() in train_text  # calibration text comes from the training split
    stamps = [p.stat().st_mtime_ns for p in (corpus.train, corpus.calib, corpus.eval)]
    write_corpus(tmp_path, small_sources)
    assert [p.stat().st_mtime_ns for p in (corpus.train, corpus.calib, corpus.eval)] == stamps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "eval.txt", "train.txt"]
