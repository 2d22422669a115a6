"""The demo model: tokenizer and training, cached by recipe and corpus, seeded, atomic."""

import json
from dataclasses import replace

import pytest
import torch

from grape.demo.corpus import write_corpus
from grape.demo.model import EOS_TOKEN, QUICK_RECIPE, train_demo_model, train_tokenizer

# A model small enough to train a few steps in a second: the caching tests need a real
# training run, not a good model.
TINY_RECIPE = replace(
    QUICK_RECIPE, steps=3, warmup=1, batch=2, seq=16, vocab_size=300, layers=1, hidden=32,
    heads=2, kv_heads=1, experts=4, intermediate=32, max_positions=64, log_every=1,
)  # fmt: skip


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
