"""Expert-wise knowledge distillation of a pruned/sparsified MoE student from its dense teacher.

loss = CE(student next-token logits) + lambda * sum over MoE layers l and student experts i of
MSE(teacher expert orig(l, i) (x), student expert i (x)) over the tokens x the *student's*
router sends to expert i, where orig(l, i) is the teacher index that student expert i came from
(``kept_experts`` of the student's ``grape_report.json``; the identity when absent).

Choices, and why:

- Both experts see the same input, the student's hidden state at the experts' input (detached
  for the distillation term). The term then measures exactly how far pruning moved expert i's
  *function* on the inputs it actually serves, and trains layer l's experts only; the teacher is
  never run as a model, only its kept experts' weights are loaded (one layer at a time).
- Only the routed experts' parameters are trained; routers, attention, norms, embeddings and
  shared experts are frozen. Sparsification changed only the experts, freezing the rest keeps
  the routing (and the ragged structure) exactly as pruning left it, keeps optimizer state small,
  and does not overfit a small distillation set.
- Sparsity masks are fixed: the zeros of the student's ``gate_up_proj``/``down_proj`` at the
  start. Gradients are masked and the mask is re-applied after every optimizer step, so pruned
  weights stay exactly zero (AdamW's weight decay is 0 for the same reason).
- Training runs in float32; the output keeps the student's dtype (zeros stay exact zeros).
- Batches are a deterministic function of (seed, step) and the RNG is re-seeded every step, so
  a run resumed from a checkpoint continues exactly as the uninterrupted run would have.

Checkpoints (trainable tensors, optimizer state, step, loss history) are written every
``checkpoint_every`` steps and after the last one into ``.<out>.distill-ckpt`` beside the output
directory, each file atomically; the final model is written like every grape checkpoint (temp
sibling, rename) and the checkpoint directory is removed once it is in place.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from grape.checkpoint import estimated_bytes, expert_counts, load_pruned, write_checkpoint
from grape.model_io import LazyCausalLM
from grape.output_guard import OutputClaim, check_disjoint, claim_output
from grape.report import write_json_atomic
from grape.training_state import STATE_FILE, load_training_state, save_training_state
from grape_kernels.experts_module import expert_forward
from grape_kernels.ragged_modeling import select_experts

__all__ = ["DistillJob", "prepare_distill", "distill", "distill_cli"]

_MASKED = ("gate_up_proj", "down_proj")


def _checkpoint_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.distill-ckpt"


def _data_digest(data_ids: torch.Tensor) -> str:
    return hashlib.sha256(data_ids.contiguous().numpy().tobytes()).hexdigest()


def _kept_experts(student_dir: Path, counts: list[int | None]) -> tuple[dict[int, list[int]], dict | None]:
    """Per MoE layer, the teacher index of every student expert (identity without a report)."""
    path = student_dir / "grape_report.json"
    report = json.loads(path.read_text()) if path.is_file() else None
    recorded = (report or {}).get("kept_experts") or {}
    kept = {}
    for layer, count in enumerate(counts):
        if count is None:
            continue
        indices = [int(i) for i in recorded.get(str(layer), range(count))]
        if len(indices) != count:
            raise ValueError(
                f"{path}: kept_experts of layer {layer} lists {len(indices)} experts but the student has {count}"
            )
        kept[layer] = indices
    return kept, report


@dataclass
class DistillJob:
    """A validated distillation run (see :func:`prepare_distill`); :meth:`run` trains and saves."""

    student: LazyCausalLM
    teacher: LazyCausalLM
    kept: dict[int, list[int]]
    student_report: dict | None
    claim: OutputClaim
    steps: int
    lr: float
    lam: float
    batch_size: int
    checkpoint_every: int
    seed: int
    resume: bool
    started: float = field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        return self.claim.out

    @property
    def checkpoint_dir(self) -> Path:
        return _checkpoint_dir(self.out)

    def _fingerprint(self, data_ids: torch.Tensor) -> dict:
        """What must match for a checkpoint to be resumed (``steps`` may grow, so it is not here)."""
        return {
            "student": str(self.student.model_dir.resolve()),
            "teacher": str(self.teacher.model_dir.resolve()),
            "lr": self.lr,
            "lambda": self.lam,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "data": _data_digest(data_ids),
        }

    def _batch(self, data_ids: torch.Tensor, step: int) -> torch.Tensor:
        """The batch of ``step``: epochs are seeded permutations of the rows, last partial batch dropped."""
        per_epoch = max(1, data_ids.shape[0] // self.batch_size)
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(data_ids.shape[0], generator=torch.Generator().manual_seed(self.seed + epoch))
        return data_ids[order[position * self.batch_size : (position + 1) * self.batch_size]]

    def _teacher_experts(self, model: nn.Module) -> dict[int, nn.Module]:
        """Per MoE layer, a frozen experts module holding the teacher's kept experts in student order."""
        adapter = self.teacher.adapter
        teachers = {}
        for layer_index, indices in self.kept.items():
            student_experts = adapter.moe_block(adapter.decoder_layers(model)[layer_index]).experts
            source = adapter.moe_block(adapter.decoder_layers(self.teacher.model)[layer_index]).experts
            prefix = f"{self.teacher.layer_prefix(layer_index)}.{adapter.block_attr}.experts"
            self.teacher.materialize(source, prefix)
            try:
                experts = copy.deepcopy(source)
            finally:
                self.teacher.release(source)
            select_experts((experts,), torch.tensor(indices), len(indices))
            for name, param in experts.named_parameters():
                if param.shape != getattr(student_experts, name).shape:
                    raise ValueError(
                        f"layer {layer_index} {name}: teacher experts {tuple(param.shape)} do not match "
                        f"the student's {tuple(getattr(student_experts, name).shape)}"
                    )
                param.requires_grad_(False)
            teachers[layer_index] = experts.float().eval()
        return teachers

    def run(self, data_ids: torch.Tensor, data_info: dict | None = None) -> dict:
        """Train, checkpoint, write the distilled student; returns the report."""
        with self.claim:
            report = self._train_and_write(data_ids, data_info)
            self.claim.commit()
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        return report

    def _train_and_write(self, data_ids: torch.Tensor, data_info: dict | None) -> dict:
        if data_ids.dim() != 2 or data_ids.shape[1] < 2 or data_ids.shape[0] == 0:
            raise ValueError(f"distillation data must be a non-empty (samples, seq_len >= 2) id tensor, got {tuple(data_ids.shape)}")
        vocab = int(self.student.config.vocab_size)
        if int(data_ids.min()) < 0 or int(data_ids.max()) >= vocab:
            raise ValueError(f"distillation token ids must lie in [0, {vocab}) (the student's vocabulary)")
        fingerprint = self._fingerprint(data_ids)
        state = self._load_checkpoint(fingerprint)

        model = load_pruned(self.student.model_dir, dtype=torch.float32)
        blocks = {i: self.student.adapter.moe_block(self.student.adapter.decoder_layers(model)[i]) for i in self.kept}
        trainable, masks = _trainable_experts(model, blocks)
        optimizer = torch.optim.AdamW(trainable.values(), lr=self.lr, weight_decay=0.0)
        history: list[dict] = []
        start = 0
        if state is not None:
            with torch.no_grad():
                for key, value in state["trainable"].items():
                    trainable[key].copy_(value)
            optimizer.load_state_dict(state["optimizer"])
            history, start = state["history"], int(state["step"])
        teachers = self._teacher_experts(model)
        kd_terms: list[torch.Tensor] = []
        handles = [
            blocks[i].experts.register_forward_hook(_expert_mse_hook(teachers[i], kd_terms)) for i in blocks
        ]
        model.train()
        t_train = time.perf_counter()
        progress = tqdm(total=self.steps, initial=start, desc="distill", unit="step")
        try:
            for step in range(start, self.steps):
                torch.manual_seed(self.seed + step)
                batch = self._batch(data_ids, step)
                kd_terms.clear()
                logits = model(input_ids=batch, use_cache=False).logits
                ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
                kd = torch.stack(kd_terms).sum() if kd_terms else ce.new_zeros(())
                loss = ce + self.lam * kd
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"distillation loss became {loss.item()} at step {step + 1}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for key, keep in masks.items():
                        trainable[key].masked_fill_(~keep, 0)
                history.append({"step": step + 1, "ce": ce.item(), "kd": kd.item(), "loss": loss.item()})
                progress.update(1)
                progress.set_postfix(ce=f"{ce.item():.3f}", kd=f"{kd.item():.4g}")
                if (step + 1) % self.checkpoint_every == 0 or step + 1 == self.steps:
                    self._save_checkpoint(step + 1, trainable, optimizer, history, fingerprint)
        finally:
            progress.close()
            for handle in handles:
                handle.remove()
        t_write = time.perf_counter()
        zeros = {
            "masked": sum(int((~keep).sum()) for keep in masks.values()),
            "after": sum(int((trainable[key] == 0).sum()) for key in masks),
        }
        return self._write(history, start, zeros, data_ids, data_info, t_train, t_write, model)

    # ---- checkpoints -----------------------------------------------------------------------
    def _load_checkpoint(self, fingerprint: dict) -> dict | None:
        path = self.checkpoint_dir / STATE_FILE
        if not self.resume:
            return None
        trainable, optimizer, extra = load_training_state(path)
        differing = [k for k, v in fingerprint.items() if extra.get("fingerprint", {}).get(k) != v]
        if differing:
            raise ValueError(
                f"cannot resume from {path}: it was made with different {', '.join(differing)}; "
                "rerun with the original settings or delete the checkpoint"
            )
        if int(extra["step"]) > self.steps:
            raise ValueError(f"the checkpoint in {self.checkpoint_dir} is at step {extra['step']}, beyond --steps {self.steps}")
        return {"trainable": trainable, "optimizer": optimizer, "history": extra["history"], "step": extra["step"]}

    def _save_checkpoint(self, step: int, trainable: dict, optimizer, history: list[dict], fingerprint: dict) -> None:
        """Write the training state atomically into the checkpoint dir (see :mod:`grape.training_state`)."""
        save_training_state(
            self.checkpoint_dir / STATE_FILE,
            trainable=trainable,
            optimizer=optimizer.state_dict(),
            extra={"step": step, "history": history, "fingerprint": fingerprint},
        )

    # ---- output ----------------------------------------------------------------------------
    def _write(
        self, history: list[dict], start: int, zeros: dict, data_ids: torch.Tensor,
        data_info: dict | None, t_train: float, t_write: float, model: nn.Module,
    ) -> dict:
        adapter = self.student.adapter
        trained_layers = adapter.decoder_layers(model)

        def transform(index: int, layer: nn.Module) -> None:
            if index in self.kept:
                trained = adapter.moe_block(trained_layers[index]).experts
                adapter.moe_block(layer).experts.load_state_dict(trained.state_dict())

        previous = dict(self.student_report or {})
        report = {
            "grape_version": __import__("grape").__version__,
            "step": "distill",
            "source_model": str(self.student.model_dir),
            "teacher": str(self.teacher.model_dir),
            "kept_experts": {str(k): v for k, v in self.kept.items()},
            "trained": "routed experts only (masks fixed); everything else frozen",
            "loss": "CE + lambda * sum over layers and experts of MSE(teacher expert, student expert) on student-routed tokens",
            "steps": self.steps,
            "lr": self.lr,
            "lambda": self.lam,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "data": {**(data_info or {}), "samples": int(data_ids.shape[0]), "seq_len": int(data_ids.shape[1])},
            "resumed_from_step": start or None,
            "history": history,
            "first": history[0] if history else None,
            "last": history[-1] if history else None,
            "expert_weight_zeros": zeros,
        }
        if self.student_report is not None:
            report["previous_steps"] = previous.pop("previous_steps", []) + [previous]
        write_checkpoint(
            self.student, self.claim, transform_layer=transform, report=report,
            plot_title="distilled student: routed experts per layer",
        )
        path = self.claim.tmp / "grape_report.json"
        report = json.loads(path.read_text())
        now = time.perf_counter()
        report["timings_s"] = {
            "setup": round(t_train - self.started, 3),
            "training": round(t_write - t_train, 3),
            "save": round(now - t_write, 3),
            "total": round(now - self.started, 3),
        }
        write_json_atomic(report, path)
        return report


def _trainable_experts(
    model: nn.Module, blocks: dict[int, nn.Module]
) -> tuple[dict[str, nn.Parameter], dict[str, torch.Tensor]]:
    """Freeze everything but the routed experts; the masks of their weight matrices.

    Returns the trainable parameters keyed ``"<layer>.<name>"`` and, for gate_up_proj and
    down_proj, the keep-masks (their non-zeros now). A gradient hook zeroes the gradient of
    every pruned weight, so the optimizer never sees a reason to move it.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    trainable: dict[str, nn.Parameter] = {}
    masks: dict[str, torch.Tensor] = {}
    for layer_index, block in blocks.items():
        for name, param in block.experts.named_parameters():
            key = f"{layer_index}.{name}"
            param.requires_grad_(True)
            trainable[key] = param
            if name in _MASKED:
                masks[key] = param.detach() != 0
                param.register_hook(lambda grad, keep=masks[key]: grad * keep)
    return trainable, masks


def _expert_mse_hook(teacher: nn.Module, terms: list[torch.Tensor]):
    """Forward hook for a student experts module: appends, per expert with routed tokens, the
    MSE between the teacher's same-index expert and the student's on the (detached) routed
    inputs, using the ids the student's router chose."""

    def hook(experts: nn.Module, args: tuple, _output) -> None:
        hidden, ids = args[0].detach(), args[1]
        for expert in range(int(experts.gate_up_proj.shape[0])):
            token_idx = torch.where(ids == expert)[0]
            if token_idx.numel() == 0:
                continue
            x = hidden[token_idx]
            with torch.no_grad():
                target = expert_forward(teacher, expert, x)
            terms.append(nn.functional.mse_loss(expert_forward(experts, expert, x), target))

    return hook


def prepare_distill(
    student_dir: str | Path,
    teacher_dir: str | Path,
    *,
    steps: int,
    lr: float,
    lam: float,
    out_dir: str | Path,
    resume: bool = False,
    checkpoint_every: int = 50,
    batch_size: int = 4,
    seed: int = 0,
    overwrite: bool = False,
) -> DistillJob:
    """Every check that reads no weights: options, both models, the expert mapping, the output.

    Raises:
        ValueError (and subclasses): bad numbers, a non-MoE model, student and teacher of
            different architectures, a kept-expert mapping that does not fit, an existing output,
            ``--resume`` without a checkpoint, or a leftover checkpoint without ``--resume``.
    """
    for name, value in (("steps", steps), ("checkpoint_every", checkpoint_every), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lambda must be a non-negative number, got {lam}")
    student = LazyCausalLM.open(student_dir)
    teacher = LazyCausalLM.open(teacher_dir)
    out = check_disjoint(out_dir, {"student model": student.model_dir, "teacher": teacher.model_dir})
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        s, t = getattr(student.config, key, None), getattr(teacher.config, key, None)
        if s != t:
            raise ValueError(f"student and teacher differ in {key} ({s!r} vs {t!r}): not the same architecture")
    student_counts = expert_counts(student.model, student)
    teacher_counts = expert_counts(teacher.model, teacher)
    kept, report = _kept_experts(student.model_dir, student_counts)
    if not kept:
        raise ValueError(f"{student.model_dir} has no layer with routed experts: nothing to distill")
    for layer, indices in kept.items():
        available = teacher_counts[layer]
        if available is None or any(not 0 <= i < available for i in indices):
            raise ValueError(f"layer {layer}: student experts map to teacher experts {indices}, the teacher has {available}")
    checkpoint = _checkpoint_dir(out)
    if resume and not (checkpoint / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume: no distillation checkpoint at {checkpoint}")
    if not resume and checkpoint.exists():
        if not overwrite:
            raise FileExistsError(
                f"an interrupted distillation left a checkpoint at {checkpoint}; pass --resume to continue it "
                "or --overwrite to start over"
            )
        shutil.rmtree(checkpoint)
    claim = claim_output(
        out,
        inputs={"student model": student.model_dir, "teacher": teacher.model_dir},
        overwrite=overwrite,
        needed_bytes=estimated_bytes(student),
    )
    return DistillJob(
        student, teacher, kept, report, claim, steps, float(lr), float(lam), batch_size, checkpoint_every, seed, resume
    )


def distill(
    student_dir: str | Path,
    teacher_dir: str | Path,
    data_ids: torch.Tensor,
    *,
    steps: int,
    lr: float,
    lam: float,
    out_dir: str | Path,
    resume: bool = False,
    checkpoint_every: int = 50,
    batch_size: int = 4,
    seed: int = 0,
    overwrite: bool = False,
    data_info: dict | None = None,
) -> dict:
    """Distill ``student_dir`` from ``teacher_dir`` on ``data_ids`` (N, L) into ``out_dir``; the report."""
    job = prepare_distill(
        student_dir, teacher_dir, steps=steps, lr=lr, lam=lam, out_dir=out_dir, resume=resume,
        checkpoint_every=checkpoint_every, batch_size=batch_size, seed=seed, overwrite=overwrite,
    )
    return job.run(data_ids, data_info)


def distill_cli(args: argparse.Namespace) -> None:
    """``grape distill``: validate, cut the text into training windows, train, print a summary.

    The text is cut into every non-overlapping ``--seq-len`` window (at most ``steps *
    batch_size`` of them, so no window is seen twice before all were seen once).
    """
    from grape.data import build_calibration_ids, load_texts, tokenize_documents
    from grape.model_io import check_positions, load_tokenizer

    job = prepare_distill(
        args.student, args.teacher, steps=args.steps, lr=args.lr, lam=args.lam, out_dir=args.out,
        resume=args.resume, checkpoint_every=args.checkpoint_every, batch_size=args.batch_size,
        seed=args.seed, overwrite=args.overwrite,
    )
    with job.claim:
        check_positions(job.student.config, args.seq_len)
        tokenizer = load_tokenizer(job.student.model_dir)
        texts = load_texts(args.data)
        windows = tokenize_documents(tokenizer, texts).numel() // args.seq_len
        samples = max(1, min(windows, args.steps * args.batch_size))
        ids = build_calibration_ids(tokenizer, texts, num_samples=samples, seq_len=args.seq_len, seed=args.seed)
        report = job.run(ids, {"source": str(args.data)})
    first, last = report["first"], report["last"]
    print(f"wrote {job.out}")
    print(
        f"steps {report['resumed_from_step'] or 0} -> {report['steps']}: CE {first['ce']:.4f} -> {last['ce']:.4f}, "
        f"expert MSE {first['kd']:.4g} -> {last['kd']:.4g}; time {report['timings_s']['total']:.1f}s"
    )
