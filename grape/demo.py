"""``grape demo``: train a small MoE, prune it with GRAPE and the baselines, compare.

The README's first command has to work on a fresh machine with no Hub access and no GPU, so
the demo brings its own trained Mixture-of-Experts model. The only text every Python
installation is guaranteed to carry is the standard library's own source code, so that is the
corpus: the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, in sorted order,
with about 5% of the files held out for evaluation. Files are held out by a hash of their
*name* (not by position or a random draw), so the split is the same on every machine and does
not shift when a Python release adds or removes a module.

Pipeline (every stage prints what it is doing):

1. corpus: ``train.txt``, ``calib.txt`` (an excerpt of it) and ``eval.txt`` in the work dir;
2. model: a byte-level BPE tokenizer and a 4-layer, 8-expert, top-2 ``MixtralForCausalLM``
   (3.9M parameters) trained from scratch with next-token loss plus a per-layer
   load-balancing loss (which keeps every expert of every layer in use, so that which experts
   a method removes matters). Training is seeded and runs a fixed number of steps rather than
   "until a deadline", so the same machine always produces the same model. The step count
   comes from measurement: 800 steps of 16 x 128 tokens took 280 CPU-seconds on one thread
   (0.35 s per step; loss 7.6 -> 3.4), which two idle cores should run in about three
   minutes. The result is cached in ``<work_dir>/model``;
3. pruning: GRAPE, every uniform baseline and ``global_soft_activation`` at 25% and 50% of all
   routed experts removed (calibration statistics are cached by :mod:`grape.prune`, so the
   twelve runs cost one calibration);
4. evaluation: held-out perplexity, parameters and bytes on disk of every model, a table of
   the original, GRAPE, the best uniform baseline and the global baseline at each budget,
   printed and written to ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from grape.files import write_text_atomic
from grape.output_guard import check_disjoint, claim_output

__all__ = [
    "EOS_TOKEN",
    "TrainRecipe",
    "DEMO_RECIPE",
    "QUICK_RECIPE",
    "stdlib_sources",
    "is_held_out",
    "split_sources",
    "Corpus",
    "write_corpus",
    "train_tokenizer",
    "demo_config",
    "train_demo_model",
    "run_demo",
]

EOS_TOKEN = "<|endoftext|>"
HELD_OUT_PERCENT = 5
CALIB_STRIDE = 8
RATIOS = (0.25, 0.5)
UNIFORM_BASELINES = ("frequency", "soft_activation", "ean", "reap")
GLOBAL_BASELINE = "global_soft_activation"
DEMO_METHODS = ("grape", *UNIFORM_BASELINES, GLOBAL_BASELINE)
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


@dataclass(frozen=True)
class _Settings:
    """How much work the pruning and evaluation stages do (``quick`` shrinks it for tests)."""

    recipe: TrainRecipe
    calib_samples: int
    eval_tokens: int


_FULL = _Settings(DEMO_RECIPE, calib_samples=64, eval_tokens=65536)
_QUICK = _Settings(QUICK_RECIPE, calib_samples=8, eval_tokens=4096)


# --------------------------------------------------------------------------------------------
# corpus


def stdlib_sources(stdlib: str | os.PathLike[str] | None = None) -> list[Path]:
    """The top-level ``*.py`` files of the standard library (``stdlib``, default: this
    interpreter's), sorted by name so the corpus does not depend on directory listing order."""
    root = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.py files in the standard library folder {root}")
    return files


def is_held_out(name: str, percent: int = HELD_OUT_PERCENT) -> bool:
    """Whether the file called ``name`` belongs to the evaluation split.

    Decided by SHA-256 of the name alone: stable across machines, Python versions (a module
    keeps its split when others are added) and runs (``hash()`` is salted per process).
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def split_sources(files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """``(train, eval)`` files, each in the order given; neither split may be empty."""
    train = [f for f in files if not is_held_out(f.name)]
    held = [f for f in files if is_held_out(f.name)]
    if not train or not held:
        raise ValueError(
            f"{len(files)} source file(s) give {len(train)} training and {len(held)} held-out "
            "file(s); the demo needs at least one of each"
        )
    return train, held


def _join(files: Sequence[Path]) -> str:
    """The files' text, separated by a blank line (as the shared models' corpora are).

    Undecodable bytes (a vendor-patched stdlib) are replaced rather than fatal: the demo only
    needs plausible text, and the same replacement happens on every run.
    """
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


@dataclass(frozen=True)
class Corpus:
    """The demo's text files: training text, calibration excerpt of it, held-out text."""

    train: Path
    calib: Path
    eval: Path


def write_corpus(work_dir: str | os.PathLike[str], files: Sequence[Path] | None = None) -> Corpus:
    """Write ``train.txt``, ``calib.txt`` and ``eval.txt`` (the split of ``files``, default:
    the stdlib) into ``work_dir``.

    ``calib.txt`` is every ``CALIB_STRIDE``-th training file: text the model was trained on,
    spread over the alphabet of module names, and several times more windows than calibration
    draws. It exists because every ``grape prune`` call tokenises its whole calibration file,
    and the full training text costs seconds of CPU per call, twelve calls per demo.

    A file whose content is already right is left alone, so re-running the demo does not
    touch its inputs.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_files, eval_files = split_sources(files if files is not None else stdlib_sources())
    corpus = Corpus(work / "train.txt", work / "calib.txt", work / "eval.txt")
    texts = (_join(train_files), _join(train_files[::CALIB_STRIDE]), _join(eval_files))
    for path, text in zip((corpus.train, corpus.calib, corpus.eval), texts):
        if not (path.is_file() and path.read_text(encoding="utf-8") == text):
            write_text_atomic(path, text)
    return corpus


# --------------------------------------------------------------------------------------------
# tokenizer and model


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
def _torch_threads(count: int) -> Iterator[None]:
    """Use ``count`` intra-op threads inside the block, restoring the caller's setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _demo_threads() -> int:
    """Intra-op threads for the demo: ``OMP_NUM_THREADS`` when set to a positive integer, else
    the cores this process may run on (the affinity mask, which containers restrict, not the
    host's count).

    The override matters on a shared machine: when other processes occupy the cores, torch's
    threads wait for each other at every operator, and on a 2-core machine with a load of ~10
    one thread trained this model 3-10x faster than two (measured). It is read at call time
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

        threads = _demo_threads()
        torch.manual_seed(recipe.seed)
        model = MixtralForCausalLM(demo_config(recipe, tokenizer.eos_token_id))
        # grouped_mm runs each expert's tokens as one GEMM: about 20% less CPU time per
        # training step than transformers' per-expert loop (measured), same losses. Only this
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
        with _torch_threads(threads):
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


# --------------------------------------------------------------------------------------------
# prune, evaluate, report


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


def _measure(path: Path, tokenizer, eval_sets: dict[str, Path], seq_len: int, max_tokens: int) -> dict:
    """Size (from the checkpoint files) and held-out perplexity (float32) of one model."""
    from grape.checkpoint import load_pruned
    from grape.evaluation import perplexity
    from grape.info import model_info

    info = model_info(path)
    model = load_pruned(path, dtype=torch.float32)
    ppl = {
        name: perplexity(model, tokenizer, source, seq_len=seq_len, max_tokens=max_tokens)
        for name, source in eval_sets.items()
    }
    return {
        "path": str(path),
        "experts": info["total_experts"],
        "parameters": info["parameters"],
        "file_bytes": info["file_bytes"],
        "perplexity": {name: r["perplexity"] for name, r in ppl.items()},
        "eval_tokens": {name: r["tokens"] for name, r in ppl.items()},
    }


def _relative_ppl(result: dict, original: dict) -> float:
    """Geometric mean over evaluation sets of perplexity / original perplexity (1.0 = no loss)."""
    logs = [math.log(p / original["perplexity"][name]) for name, p in result["perplexity"].items()]
    return math.exp(sum(logs) / len(logs))


def _table_row(label: str, result: dict, original: dict) -> dict:
    row = {
        "model": label,
        "experts": f"{result['experts']}/{original['experts']}",
        "params (M)": result["parameters"] / 1e6,
        "disk (MB)": result["file_bytes"] / 1e6,
    }
    row.update({f"ppl {name}": p for name, p in result["perplexity"].items()})
    # a percentage rather than a ratio: "1" and "1.0003" print alike at table precision
    row["ppl change %"] = 100.0 * (_relative_ppl(result, original) - 1.0)
    return row


def _summary_rows(original: dict, pruned: dict[tuple[str, float], dict]) -> list[dict]:
    """Original; then per budget GRAPE, the best uniform baseline (by perplexity) and the
    global baseline."""
    rows = [_table_row("original", original, original)]
    for ratio in RATIOS:
        pct = f"{ratio:.0%}"
        best = min(UNIFORM_BASELINES, key=lambda m: _relative_ppl(pruned[m, ratio], original))
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
    from transformers import AutoConfig, AutoTokenizer

    from grape.budget import Budget
    from grape.methods import available_methods
    from grape.prune import PruneOptions, prune
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

    with _torch_threads(_demo_threads()):
        if model is None:
            corpus = write_corpus(work)
            model_dir = work / "model"
            training = train_demo_model(corpus.train, model_dir, settings.recipe)
            calib, eval_sets = corpus.calib, {"eval": corpus.eval}
        else:
            model_dir = Path(model)
            calib, eval_sets, training = _external_model(model_dir, work)
        t_model = time.perf_counter()
        max_positions = AutoConfig.from_pretrained(model_dir).max_position_embeddings
        seq_len = _window_length(model_dir, max_positions)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        print(f"evaluating the original model on {', '.join(map(str, eval_sets.values()))}", flush=True)
        original = _measure(model_dir, tokenizer, eval_sets, seq_len, settings.eval_tokens)

        pruned: dict[tuple[str, float], dict] = {}
        (work / "pruned").mkdir(exist_ok=True)
        for ratio in RATIOS:
            for method in DEMO_METHODS:
                out = work / "pruned" / f"{method}-{round(ratio * 100)}"
                print(f"pruning {ratio:.0%} of the experts with {method}", flush=True)
                prune(
                    PruneOptions(
                        model=str(model_dir),
                        method=method,
                        out=str(out),
                        calib=str(calib),
                        budget=Budget(ratio=ratio),
                        calib_samples=settings.calib_samples,
                        seq_len=seq_len,
                        overwrite=True,
                    )
                )
                pruned[method, ratio] = _measure(out, tokenizer, eval_sets, seq_len, settings.eval_tokens)

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
