"""The demo's model: a byte-level BPE tokenizer and a small Mixtral trained from scratch.

A 4-layer, 8-expert, top-2 ``MixtralForCausalLM`` (3.9M parameters) trained with next-token
loss plus a per-layer load-balancing loss (which keeps every expert of every layer in use, so
that which experts a method removes matters). Training is seeded and runs a fixed number of
steps rather than "until a deadline", so the same machine always produces the same model; the
step count and its measured cost are in the README. The result is cached in
``<work_dir>/model`` and reused while its recorded recipe and corpus hash match.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from grape.output_guard import claim_output

__all__ = [
    "EOS_TOKEN",
    "TRAINING_MARKER",
    "TrainRecipe",
    "DEMO_RECIPE",
    "QUICK_RECIPE",
    "train_tokenizer",
    "demo_config",
    "demo_threads",
    "torch_threads",
    "train_demo_model",
]

EOS_TOKEN = "<|endoftext|>"
TRAINING_MARKER = "training.json"


@dataclass(frozen=True)
class TrainRecipe:
    """Everything that determines the trained demo model; a cached model is reused only when
    its recorded recipe equals the requested one.

    The learning rate (3e-3) is high for a transformer because the model is tiny and the run
    short. ``aux_loss_coef`` weighs the per-layer load-balancing loss (see
    :func:`_balance_loss`); 0.02 is 20x Mixtral's default, to spread tokens over every
    expert of every layer within a few hundred steps.
    """

    steps: int = 800
    batch: int = 16
    seq: int = 128
    lr: float = 3e-3
    warmup: int = 50
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    vocab_size: int = 2048
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    intermediate: int = 256
    max_positions: int = 512
    aux_loss_coef: float = 0.02
    log_every: int = 25


DEMO_RECIPE = TrainRecipe()
QUICK_RECIPE = replace(DEMO_RECIPE, steps=20, warmup=5, log_every=5)


def train_tokenizer(texts: Sequence[str], vocab_size: int, *, max_length: int = 512):
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Byte-level (GPT-2 style) means any text, in any encoding quirk, tokenises without unknown
    tokens. ``<|endoftext|>`` is token 0 and serves as EOS/BOS/UNK, which is what grape's data
    code needs to separate documents. The BPE trainer breaks ties deterministically, so the
    same texts always give the same vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= 256 + 1:
        raise ValueError(f"vocab_size must exceed the 256 byte tokens plus EOS, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=max_length,
    )


def demo_config(recipe: TrainRecipe, eos_token_id: int):
    """The ``MixtralConfig`` of the demo model.

    ``output_router_logits`` stays off: training asks for the router logits explicitly and
    computes its own balancing loss, and inference (pruning, evaluation) needs neither.
    """
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        num_local_experts=recipe.experts,
        num_experts_per_tok=recipe.top_k,
        max_position_embeddings=recipe.max_positions,
        output_router_logits=False,
        router_aux_loss_coef=recipe.aux_loss_coef,
        tie_word_embeddings=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def _balance_loss(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss computed per layer, averaged over layers.

    transformers' ``load_balancing_loss_func`` pools the routing counts of *all* layers before
    balancing, so it only balances expert index j summed over layers: a model trained with it
    (coefficient 0.02, 800 steps) ended with experts that received 1 of 16,384 routings in one
    layer while expert j was overloaded in another, and the shared ``mixtral-8x-pydoc`` has
    experts with 0 tokens. Dead experts turn the demo into "which method finds the dead
    experts"; balancing each layer gives a model whose experts all work, which is what pruning
    methods should be compared on. It equals top_k when every layer's routing is balanced.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    experts = router_logits[0].shape[-1]
    losses = [load_balancing_loss_func((logits,), experts, top_k) for logits in router_logits]
    return torch.stack(losses).mean()


def _lr_factor(step: int, recipe: TrainRecipe) -> float:
    """Linear warm-up to 1, then cosine decay to ``final_lr_fraction`` at the last step."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup - 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.final_lr_fraction + (1.0 - recipe.final_lr_fraction) * cosine


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Use ``count`` intra-op threads inside the block, restoring the caller's setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def demo_threads() -> int:
    """Intra-op threads for the demo: ``OMP_NUM_THREADS`` when set to a positive integer, else
    the cores this process may run on (the affinity mask, which containers restrict, not the
    host's count).

    The override matters on a shared machine: when other processes occupy the cores, torch's
    threads wait for each other at every operator, and on a 2-core machine with a load of ~10
    one thread trained this model several times faster than two (README). It is read at call time
    (torch reads it only at start-up) so that a caller can set it for one run.
    """
    requested = os.environ.get("OMP_NUM_THREADS", "")
    if requested.isdigit() and int(requested) >= 1:
        return int(requested)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS / Windows
        return os.cpu_count() or 1


def _corpus_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _finished_model(model_dir: Path, recipe: TrainRecipe, corpus_sha256: str) -> dict | None:
    """The training record of ``model_dir`` if it holds a finished model trained with exactly
    this recipe on exactly this corpus, else None (then it is retrained)."""
    marker = model_dir / TRAINING_MARKER
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("recipe") != asdict(recipe) or record.get("corpus_sha256") != corpus_sha256:
        return None
    if not (model_dir / "model.safetensors").is_file() or not (model_dir / "tokenizer.json").is_file():
        return None
    return record


def train_demo_model(
    train_path: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    recipe: TrainRecipe = DEMO_RECIPE,
    *,
    log: Callable[[str], None] = print,
) -> dict:
    """Train (or reuse) the demo tokenizer and MoE on the text of ``train_path``.

    The model is trained in a temporary sibling of ``model_dir`` and renamed into place only
    when ``training.json`` (the "finished" marker: recipe, corpus hash, loss curve, timing) has
    been written, so an interrupted run never leaves a model that looks finished. A finished
    model with the same recipe and corpus is reused without training.

    Batches are ``recipe.batch`` windows of ``recipe.seq`` tokens at random offsets of the
    tokenised training text, drawn from a generator seeded with ``recipe.seed`` (as is the
    weight initialisation), so a run is reproducible on one machine.

    Returns:
        The training record (also in ``<model_dir>/training.json``), with ``"cached"`` set to
        whether training was skipped.
    """
    from transformers import MixtralForCausalLM

    model_dir = Path(model_dir)
    text = Path(train_path).read_text(encoding="utf-8")
    digest = _corpus_digest(text)
    record = _finished_model(model_dir, recipe, digest)
    if record is not None:
        log(f"model: reusing {model_dir} ({record['steps']} steps, final loss {record['final_loss']:.3f})")
        return {**record, "cached": True}

    started = time.perf_counter()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    claim = claim_output(model_dir, inputs={"training text": train_path}, overwrite=True, marker=TRAINING_MARKER)
    with claim:
        tmp = claim.tmp
        tokenizer = train_tokenizer([text], recipe.vocab_size, max_length=recipe.max_positions)
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        stream = torch.tensor(ids, dtype=torch.long)
        if stream.numel() <= recipe.seq:
            raise ValueError(
                f"{train_path} has {stream.numel()} tokens; training needs more than {recipe.seq}"
            )
        log(f"model: tokenizer ({len(tokenizer)} tokens) trained; corpus is {stream.numel():,} tokens "
            f"({time.perf_counter() - started:.1f}s)")

        threads = demo_threads()
        torch.manual_seed(recipe.seed)
        model = MixtralForCausalLM(demo_config(recipe, tokenizer.eos_token_id))
        # grouped_mm runs each expert's tokens as one GEMM: less CPU time per training step
        # than transformers' per-expert loop (README), same losses. Only this
        # in-memory model uses it; the saved config does not record it.
        model.set_experts_implementation("grouped_mm")
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
        generator = torch.Generator().manual_seed(recipe.seed)
        offsets = torch.arange(recipe.seq)
        loss_log: list[list[float]] = []
        t_train, cpu_train = time.perf_counter(), time.process_time()
        with torch_threads(threads):
            for step in range(recipe.steps):
                starts = torch.randint(
                    0, stream.numel() - recipe.seq + 1, (recipe.batch, 1), generator=generator
                )
                batch = stream[starts + offsets]
                out = model(input_ids=batch, output_router_logits=True, use_cache=False)
                lm_loss = torch.nn.functional.cross_entropy(
                    out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()
                )
                aux_loss = _balance_loss(out.router_logits, recipe.top_k)
                (lm_loss + recipe.aux_loss_coef * aux_loss).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                if step % recipe.log_every == 0 or step == recipe.steps - 1:
                    lm, aux = lm_loss.item(), aux_loss.item()
                    loss_log.append([step, round(lm, 4), round(aux, 4)])
                    log(f"model: step {step + 1}/{recipe.steps}  loss {lm:.3f}  balance {aux:.3f}  "
                        f"({time.perf_counter() - t_train:.0f}s)")
        train_seconds = time.perf_counter() - t_train
        cpu_seconds = time.process_time() - cpu_train

        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "arch": "mixtral",
            "steps": recipe.steps,
            "batch": recipe.batch,
            "seq": recipe.seq,
            "seed": recipe.seed,
            "params": sum(p.numel() for p in model.parameters()),
            "train_tokens_seen": recipe.steps * recipe.batch * recipe.seq,
            "corpus": str(train_path),
            "corpus_tokens": stream.numel(),
            "corpus_sha256": digest,
            "threads": threads,
            "train_seconds": round(train_seconds, 1),
            # CPU time next to wall time: on a shared machine wall time says more about the
            # neighbours than about the training.
            "train_cpu_seconds": round(cpu_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "final_loss": loss_log[-1][1],
            "loss_log_columns": ["step", "lm_loss", "balance_loss"],
            "balance_loss": "Switch load-balancing loss of each layer, averaged over layers",
            "loss_log": loss_log,
            "recipe": asdict(recipe),
        }
        record["files"] = sorted([p.name for p in tmp.iterdir()] + [TRAINING_MARKER])
        (tmp / TRAINING_MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        claim.commit()
    log(f"model: trained {recipe.steps} steps in {train_seconds:.0f}s on {threads} thread(s); "
        f"final loss {record['final_loss']:.3f}; saved to {model_dir}")
    return {**record, "cached": False}
