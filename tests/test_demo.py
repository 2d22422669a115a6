"""``grape demo``: the stdlib corpus split, tokenizer and model training, and one quick end-to-end run."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from grape.demo import (
    EOS_TOKEN,
    QUICK_RECIPE,
    Corpus,
    is_held_out,
    run_demo,
    split_sources,
    stdlib_sources,
    train_demo_model,
    train_tokenizer,
    write_corpus,
)

# A model small enough to train a few steps in a second: the caching tests need a real
# training run, not a good model.
TINY_RECIPE = replace(
    QUICK_RECIPE, steps=3, warmup=1, batch=2, seq=16, vocab_size=300, layers=1, hidden=32,
    heads=2, kv_heads=1, experts=4, intermediate=32, max_positions=64, log_every=1,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Train and evaluate on one thread: on a loaded CI machine a two-thread pool is several
    times slower, and these tests check mechanics, not speed."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def small_sources() -> list[Path]:
    """A few small stdlib files, including at least one held-out file."""
    files = [f for f in stdlib_sources() if f.stat().st_size < 8000]
    train, held = split_sources(files)
    return sorted(train[:6] + held[:1])


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


def test_tokenizer_is_byte_level_deterministic_and_reloads(tmp_path, small_sources):
    from transformers import AutoTokenizer

    texts = [f.read_text() for f in small_sources]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    again = train_tokenizer(texts, vocab_size=400)
    assert tokenizer.get_vocab() == again.get_vocab()
    assert len(tokenizer) == 400
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 0
    sample = texts[0][:2000] + "\n# π ≈ 3.14159, naïve café 🐍\n"
    ids = tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"]
    assert tokenizer.decode(ids) == sample  # bytes never become unknown tokens
    assert len(ids) < 0.75 * len(sample.encode())  # merges were learned
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(sample, add_special_tokens=False, verbose=False)["input_ids"] == ids
    assert reloaded.eos_token_id == 0
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, vocab_size=200)


def test_train_demo_model_trains_once_and_reuses(tmp_path, small_sources):
    from transformers import AutoTokenizer, MixtralForCausalLM

    corpus = write_corpus(tmp_path, small_sources)
    logs: list[str] = []
    record = train_demo_model(corpus.train, tmp_path / "model", TINY_RECIPE, log=logs.append)
    assert not record["cached"] and record["steps"] == 3
    assert [step for step, *_ in record["loss_log"]] == [0, 1, 2]
    saved = json.loads((tmp_path / "model" / "training.json").read_text())
    assert saved["recipe"]["steps"] == 3 and saved["corpus_tokens"] > TINY_RECIPE.seq
    model = MixtralForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.num_local_experts == 4 and not model.config.output_router_logits
    assert AutoTokenizer.from_pretrained(tmp_path / "model").eos_token_id == model.config.eos_token_id == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "eval.txt", "model", "train.txt"]

    weights = tmp_path / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert train_demo_model(corpus.train, tmp_path / "model", TINY_RECIPE, log=logs.append)["cached"]
    assert weights.stat().st_mtime_ns == stamp
    # Another recipe (or another corpus) is another model: retrained, replacing the old one.
    record = train_demo_model(corpus.train, tmp_path / "model", replace(TINY_RECIPE, steps=2), log=logs.append)
    assert not record["cached"] and json.loads((tmp_path / "model" / "training.json").read_text())["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "eval.txt", "model", "train.txt"]


def test_train_demo_model_is_seeded(tmp_path, small_sources):
    from safetensors.torch import load_file

    corpus = write_corpus(tmp_path, small_sources)
    first = train_demo_model(corpus.train, tmp_path / "a", TINY_RECIPE, log=lambda _: None)
    second = train_demo_model(corpus.train, tmp_path / "b", TINY_RECIPE, log=lambda _: None)
    assert first["loss_log"] == second["loss_log"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_training_leaves_no_model(tmp_path, small_sources):
    corpus = write_corpus(tmp_path, small_sources)

    def interrupt(message: str) -> None:
        if "step 2/" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_demo_model(corpus.train, tmp_path / "model", TINY_RECIPE, log=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "eval.txt", "train.txt"]


def test_demo_rejects_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        run_demo(tmp_path / "work", quick=True, model=str(tmp_path))


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    results = run_demo(tmp_path, quick=True)

    table = (tmp_path / "results.md").read_text()
    labels = [row["model"] for row in results["summary"]]
    assert labels[0] == "original" and len(labels) == 7
    for pct in ("25%", "50%"):
        assert f"grape @{pct}" in labels and f"global_soft_activation @{pct}" in labels
        assert sum(label.endswith(f"@{pct} (best uniform)") for label in labels) == 1
    assert all(label in table for label in labels)
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]

    original = results["original"]
    assert len(results["pruned"]) == 12  # 6 methods x 2 budgets
    for name, result in results["pruned"].items():
        assert result["parameters"] < original["parameters"], name
        assert result["file_bytes"] < original["file_bytes"], name
        assert result["experts"] == original["experts"] * (0.75 if name.endswith("@0.25") else 0.5)
        assert all(ppl > 1 for ppl in result["perplexity"].values())
        assert Path(result["path"], "grape_report.json").is_file()
    assert json.loads((tmp_path / "model" / "training.json").read_text())["steps"] == QUICK_RECIPE.steps


def test_a_given_model_brings_its_own_data_or_gets_the_stdlib_split(tmp_path):
    from grape.demo import _external_model

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calib, eval_sets, training = _external_model(model, tmp_path / "work")
    assert calib == tmp_path / "work" / "calib.txt" and calib.is_file()
    assert eval_sets == {"eval": tmp_path / "work" / "eval.txt"} and training is None

    (model / "calib.txt").write_text("calibration text")
    (model / "eval_code.txt").write_text("held-out code")
    (model / "training.json").write_text('{"seq": 256}')
    calib, eval_sets, training = _external_model(model, tmp_path / "other")
    assert (calib, eval_sets, training) == (model / "calib.txt", {"code": model / "eval_code.txt"}, {"seq": 256})
    assert not (tmp_path / "other").exists()  # nothing to fall back on, nothing written
