"""grape's local lm-eval tasks: item construction, and lm-eval's own runner end to end.

The end-to-end test runs the real ``lm_eval.simple_evaluate`` through
:func:`grape.evaluation.evaluate_tasks` on a small random Mixtral and checks its accuracies
against an independent scorer: every choice's log-likelihood computed here, in float64, from
the model's logits on the joint tokenisation of context and choice.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from grape.data import load_texts
from grape.evaluation import evaluate_tasks
from grape.tasks import STDLIB_TASK, NextLineSpec, local_task_dir, next_line_items, text_task_name

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = ["textwrap.py", "fnmatch.py", "colorsys.py", "bisect.py"]

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install grape-moe[eval])")


def _documents() -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in SOURCES]


def test_items_are_real_next_lines_with_far_away_distractors() -> None:
    docs = _documents()
    spec = NextLineSpec(num_items=40, num_choices=4, context_lines=5, min_distance=150)
    items = next_line_items(docs, spec, seed=3)
    assert len(items) == 40
    lines = [(d, n, raw.rstrip()) for d, text in enumerate(docs) for n, raw in enumerate(text.splitlines())]
    by_text: dict[str, list[int]] = {}
    for i, (_, _, raw) in enumerate(lines):
        by_text.setdefault(raw.strip(), []).append(i)
    for item in items:
        answer = item["choices"][item["label"]]
        assert len(set(item["choices"])) == 4
        assert all(spec.min_chars <= len(c) <= spec.max_chars and c == c.strip() for c in item["choices"])
        # The context is the five raw lines before a line whose text is the answer, then that
        # line's indentation: find where in the documents this happens.
        *context, indent = item["context"].split("\n")
        where = [
            i for i in by_text[answer]
            if [raw for _, _, raw in lines[i - 5 : i]] == context and lines[i][2].startswith(indent + answer)
        ]
        assert where, item
        i = where[0]
        assert answer not in {raw.strip() for raw in context}
        for choice in item["choices"]:
            if choice != answer:
                assert all(lines[j][0] != lines[i][0] or abs(j - i) >= 150 for j in by_text[choice])
    # Deterministic, and the seed matters.
    assert next_line_items(docs, spec, seed=3) == items
    assert next_line_items(docs, spec, seed=4) != items
    labels = [item["label"] for item in items]
    assert len(set(labels)) == 4  # the answer's position is shuffled


def test_task_names_and_bad_text(tmp_path: Path) -> None:
    assert text_task_name("/x/eval_code.txt") == "grape_next_line_eval_code"
    assert text_task_name("My Docs-v2.txt") == "grape_next_line_my_docs_v2"
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    with pytest.raises(ValueError, match="no line usable"):
        with local_task_dir([], [short]):
            pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text("\n\n".join(_documents()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(corpus) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([corpus.read_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def model(tokenizer) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    return MixtralForCausalLM(config).eval()


def _reference_accuracy(model, tokenizer, items: list[dict]) -> tuple[float, float]:
    """acc and acc_norm by scoring each choice here, the obvious way."""
    hits = norm_hits = 0
    for item in items:
        context = item["context"].rstrip()  # lm-eval moves trailing whitespace to the choice
        moved = item["context"][len(context) :]
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(context + moved + choice, add_special_tokens=False)["input_ids"]
            start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(start, len(whole))))
        norms = [s / len(c.encode("utf-8")) for s, c in zip(scores, item["choices"])]
        hits += max(range(len(scores)), key=scores.__getitem__) == item["label"]
        norm_hits += max(range(len(norms)), key=norms.__getitem__) == item["label"]
    return hits / len(items), norm_hits / len(items)


def test_lm_eval_runs_grape_tasks_end_to_end(model, tokenizer, corpus) -> None:
    name = text_task_name(corpus)
    out = evaluate_tasks(model, tokenizer, [name, STDLIB_TASK], batch_size=4, limit=12, task_texts=[corpus])
    json.dumps(out)  # the report part is JSON-serialisable
    items = next_line_items(load_texts(corpus))[:12]
    acc, acc_norm = _reference_accuracy(model, tokenizer, items)
    result = out["results"][name]
    assert result["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert result["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-12)
    assert 0.0 <= out["results"][STDLIB_TASK]["acc,none"] <= 1.0
    assert out["versions"][name] == 1.0 and out["n-shot"][name] == 0


def test_unknown_tasks_and_folders_are_refused(model, tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_tasks(model, tokenizer, [STDLIB_TASK], batch_size=1, task_paths=[tmp_path / "nope"])
    with pytest.raises(ValueError, match=f"unknown task.*{STDLIB_TASK}"):
        evaluate_tasks(model, tokenizer, ["grape_no_such_task"], batch_size=1)


def test_cli_eval_runs_a_text_task(model, tokenizer, corpus, tmp_path: Path) -> None:
    """``grape eval DIR --tasks grape_next_line_<stem> --task-text FILE --limit N`` end to end."""
    from grape.cli import main

    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    name = text_task_name(corpus)
    out = tmp_path / "eval.json"
    argv = ["eval", str(model_dir), "--tasks", name, "--task-text", str(corpus), "--limit", "6", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())["tasks"]["results"][name]
    acc, acc_norm = _reference_accuracy(model, tokenizer, next_line_items(load_texts(corpus))[:6])
    assert result["acc,none"] == pytest.approx(acc, abs=1e-6)
    assert result["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-6)
