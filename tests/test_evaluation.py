"""Tests of grape.evaluation: perplexity against a naive reference, and the lm-eval bridge."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from grape.data import CalibrationDataError
from grape.evaluation import EvalDependencyError, evaluate_tasks, perplexity

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Mixture-of-experts models route every token to a few experts; pruning removes some.",
    "def f(x):\n    return x * 2\n\nprint(f(21))\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the test documents (no files needed)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(DOCS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def model(tokenizer) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(config).eval()


def _stream(tokenizer, docs: list[str]) -> list[int]:
    """Token stream built from the raw `tokenizers` object: documents with EOS between them."""
    eos = tokenizer.backend_tokenizer.token_to_id("<eos>")
    out: list[int] = []
    for i, doc in enumerate(docs):
        out += ([eos] if i else []) + tokenizer.backend_tokenizer.encode(doc, add_special_tokens=False).ids
    return out


def _naive_nll(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """One window at a time, float64 log-softmax, a Python loop over predicted tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), seq_len):
            window = ids[start : start + seq_len]
            if len(window) < 2:
                continue
            logits = model(input_ids=torch.tensor([window])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(len(window) - 1):
                total -= float(logp[t, window[t + 1]])
                count += 1
    return total / count, count


@pytest.mark.parametrize("seq_len", [16, 23])
def test_perplexity_matches_naive_reference(model, tokenizer, seq_len: int) -> None:
    ids = _stream(tokenizer, DOCS)
    assert len(ids) % seq_len >= 2  # the partial last window is part of the check
    ref_nll, ref_count = _naive_nll(model, ids, seq_len)
    result = perplexity(model, tokenizer, DOCS, seq_len=seq_len, batch_size=3)
    assert result["tokens"] == ref_count == len(ids) - math.ceil(len(ids) / seq_len)
    assert result["seq_len"] == seq_len
    assert result["nll"] == pytest.approx(ref_nll, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(ref_nll), rel=1e-6)


def test_batch_size_does_not_change_result(model, tokenizer) -> None:
    one = perplexity(model, tokenizer, DOCS, seq_len=16, batch_size=1)
    many = perplexity(model, tokenizer, DOCS, seq_len=16, batch_size=5)
    assert one["tokens"] == many["tokens"]
    assert one["nll"] == pytest.approx(many["nll"], rel=1e-6)


def test_max_tokens_and_single_token_tail(model, tokenizer) -> None:
    ids = _stream(tokenizer, DOCS)
    # 3 full windows + a 1-token tail: the tail predicts nothing and is skipped
    result = perplexity(model, tokenizer, DOCS, seq_len=10, max_tokens=31)
    assert result["tokens"] == 3 * 9
    assert result["nll"] == pytest.approx(_naive_nll(model, ids[:30], 10)[0], rel=1e-6)
    result = perplexity(model, tokenizer, DOCS, seq_len=10, max_tokens=35)
    assert result["tokens"] == 3 * 9 + 4
    assert result["nll"] == pytest.approx(_naive_nll(model, ids[:35], 10)[0], rel=1e-6)


def test_file_folder_and_text_inputs_agree(model, tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(DOCS[0])
    (folder / "b.txt").write_text(DOCS[1])
    (folder / "sub" / "c.txt").write_text(DOCS[2])
    from_list = perplexity(model, tokenizer, DOCS, seq_len=16)
    assert perplexity(model, tokenizer, folder, seq_len=16) == from_list
    assert perplexity(model, tokenizer, str(folder / "a.txt"), seq_len=16) == perplexity(
        model, tokenizer, DOCS[0], seq_len=16
    )


def test_training_mode_is_restored(model, tokenizer) -> None:
    model.train()
    try:
        perplexity(model, tokenizer, DOCS[1], seq_len=16)
        assert model.training
    finally:
        model.eval()
    perplexity(model, tokenizer, DOCS[1], seq_len=16)
    assert not model.training


def test_perplexity_rejects_bad_input(model, tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        perplexity(model, tokenizer, DOCS, seq_len=1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        perplexity(model, tokenizer, DOCS, batch_size=0)
    with pytest.raises(ValueError, match="max_tokens must be None or an integer >= 2"):
        perplexity(model, tokenizer, DOCS, seq_len=16, max_tokens=1)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=64"):
        perplexity(model, tokenizer, DOCS, seq_len=65)
    with pytest.raises(CalibrationDataError, match="no such file"):
        perplexity(model, tokenizer, str(tmp_path / "eval.txt"), seq_len=16)
    with pytest.raises(CalibrationDataError, match="at least 2 are needed"):
        perplexity(model, tokenizer, "x", seq_len=16)
    with pytest.raises(CalibrationDataError, match="empty"):
        perplexity(model, tokenizer, "   ", seq_len=16)


# ---- lm-eval bridge -------------------------------------------------------------------------


def test_evaluate_tasks_without_lm_eval(model, tokenizer, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(EvalDependencyError, match=r"pip install grape-moe\[eval\]"):
        evaluate_tasks(model, tokenizer, ["arc_easy"], batch_size=2)


def test_evaluate_tasks_rejects_bad_arguments_before_importing(model, tokenizer, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ValueError, match="non-empty list of task names"):
        evaluate_tasks(model, tokenizer, [], batch_size=2)
    with pytest.raises(ValueError, match="non-empty list of task names"):
        evaluate_tasks(model, tokenizer, "arc_easy", batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_tasks(model, tokenizer, ["arc_easy"], batch_size=0)
    with pytest.raises(ValueError, match="limit"):
        evaluate_tasks(model, tokenizer, ["arc_easy"], batch_size=1, limit=0)
