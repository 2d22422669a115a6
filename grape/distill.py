"""``grape distill``: knowledge distillation of a pruned or sparsified MoE student from its teacher.

loss = CE(student next-token logits) + lambda * (the target's terms), where the target
(:mod:`grape.distill_targets`) is chosen by what the student's pruning changed:

- **A sparsified student** (every MoE layer has the teacher's experts): ``"experts"``, MSE
  between student expert i and the teacher expert orig(l, i) it came from (``kept_experts`` of
  the student's ``grape_report.json``; the identity when absent), on the tokens the student's
  router sends to it. Trained: the routed experts of every MoE layer.
- **An expert-pruned student** (dropped or merged: some layer has fewer experts than the
  teacher's): ``"blocks"``, MSE between the student's MoE block and the teacher's unpruned
  block, on the student's hidden state at the block's input. The student's experts no longer
  compute what one teacher expert computed, so the target moves up to the level where both
  sides still mean the same thing. Trained: the routers and routed experts of the layers that
  lost experts.

Choices, and why:

- **Only what the pruning changed is trained.** Sparsification changed the experts; expert
  pruning changed the experts a layer has *and* which of them its router picks, so there the
  router is trained too (a kept router row was learned against competitors that are gone).
  Attention, norms, embeddings, shared experts and the layers pruning left whole stay frozen:
  it keeps the optimizer state small, and does not overfit a small distillation set.
  ``train="router"`` trains the routers alone (router re-calibration: a few thousand
  parameters per layer), ``train="experts"`` the experts alone.
- **The checkpoint stays what it was**: the same experts per layer (ragged stays ragged), and
  the exact zeros of the student's expert matrices (a sparsified student's pruned weights)
  stay zero: gradients are masked and the mask is re-applied after every optimizer step
  (AdamW's weight decay is 0 for the same reason).
- Training runs in float32; the output keeps the student's dtype (zeros stay exact zeros).
  Quantized students are not handled here (see the checkpoint reader).

The stages (:mod:`grape.pipeline`): open student and teacher -> validate (numbers, the two
architectures, the expert mapping, the target and what it trains, the training text cut into
windows, resumable state) -> calibrate = train (:mod:`grape.distill_training`; resumable state
in ``.<out>.distill-ckpt`` beside the output, every ``checkpoint_every`` steps) -> write the
student with its trained routers and experts -> report. The state directory is removed once
the output is in place.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from grape.checkpoint import expert_counts
from grape.distill_targets import TARGETS
from grape.distill_training import TrainingSettings, train_student, trainable_parts
from grape.errors import InputError, OutputExistsError
from grape.model_io import LazyCausalLM
from grape.pipeline import CommonOptions, Pipeline, run_pipeline, stage_labels
from grape.quant.formats import refuse_training
from grape.report import previous_report
from grape.training_state import STATE_FILE

__all__ = ["DistillOptions", "DistillPipeline", "distill"]

_PARTS = ("router", "experts", "router+experts")


@dataclass(frozen=True, kw_only=True)
class DistillOptions(CommonOptions):
    """``grape distill``'s own options; ``model`` is the student, ``calib`` the training text.

    The text is cut into every non-overlapping ``seq_len`` window, at most ``steps *
    batch_size`` of them (so no window is seen twice before all were seen once).

    Attributes:
        target: ``"experts"``, ``"blocks"`` or ``"auto"`` (blocks when some layer lost
            experts, else experts; see the module docs).
        train: ``"router"``, ``"experts"``, ``"router+experts"`` or ``"auto"`` (experts for the
            expert target, router+experts for the block target).
    """

    teacher: str
    steps: int = 100
    lr: float = 1e-4
    lam: float = 1.0
    checkpoint_every: int = 50
    resume: bool = False
    batch_size: int = 4
    seq_len: int = 256
    target: str = "auto"
    train: str = "auto"
    not_recorded: ClassVar[tuple[str, ...]] = (*CommonOptions.not_recorded, "resume")


def _kept_experts(student_dir: Path, counts: list[int | None]) -> dict[int, list[int]]:
    """Per MoE layer, the teacher index of every student expert (identity without a report)."""
    recorded = (previous_report(student_dir) or {}).get("kept_experts") or {}
    kept = {}
    for layer, count in enumerate(counts):
        if count is None:
            continue
        indices = [int(i) for i in recorded.get(str(layer), range(count))]
        if len(indices) != count:
            raise InputError(
                f"{student_dir}: kept_experts of layer {layer} lists {len(indices)} experts but the student has {count}"
            )
        kept[layer] = indices
    return kept


class DistillPipeline(Pipeline):
    """Distillation through the shared stages (see the module docs)."""

    step = "distill"
    timing_labels = stage_labels(calibrate="training", plan="training", write="save")
    options: DistillOptions

    def open(self) -> None:
        o = self.options
        for name, value in (("steps", o.steps), ("checkpoint_every", o.checkpoint_every), ("batch_size", o.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not (math.isfinite(o.lr) and o.lr > 0):
            raise InputError(f"lr must be a positive number, got {o.lr}")
        if not (math.isfinite(o.lam) and o.lam >= 0):
            raise InputError(f"lambda must be a non-negative number, got {o.lam}")
        if o.target not in ("auto", *TARGETS):
            raise InputError(f"target must be auto, {' or '.join(TARGETS)}, got {o.target!r}")
        if o.train not in ("auto", *_PARTS):
            raise InputError(f"train must be auto, {', '.join(_PARTS)}, got {o.train!r}")
        super().open()
        refuse_training(self.lazy.format, f"the student {self.lazy.model_dir}")
        self.teacher = LazyCausalLM.open(o.teacher)

    @property
    def state_dir(self) -> Path:
        """Where resumable training state lives: beside the output, named after it."""
        out = Path(os.path.realpath(self.options.out))
        return out.parent / f".{out.name}.distill-ckpt"

    def validate(self) -> None:
        o, student, teacher = self.options, self.lazy, self.teacher
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            s, t = getattr(student.config, key, None), getattr(teacher.config, key, None)
            if s != t:
                raise InputError(f"student and teacher differ in {key} ({s!r} vs {t!r}): not the same architecture")
        self.kept = _kept_experts(student.model_dir, expert_counts(student.model, student))
        if not self.kept:
            raise InputError(f"{student.model_dir} has no layer with routed experts: nothing to distill")
        teacher_counts = expert_counts(teacher.model, teacher)
        for layer, indices in self.kept.items():
            available = teacher_counts[layer]
            if available is None or any(not 0 <= i < available for i in indices):
                raise InputError(f"layer {layer}: student experts map to teacher experts {indices}, the teacher has {available}")
        self.settings = self._settings(teacher_counts)
        state = self.state_dir / STATE_FILE
        if o.resume and not state.is_file():
            raise FileNotFoundError(f"--resume: no distillation checkpoint at {self.state_dir}")
        if not o.resume and self.state_dir.exists() and not o.overwrite:
            raise OutputExistsError(
                f"an interrupted distillation left a checkpoint at {self.state_dir}; pass --resume to continue it "
                "or --overwrite to start over"
            )
        self.ids = self.load_calibration(required_by="grape distill")
        if self.ids.shape[1] < 2:
            raise InputError(f"distillation windows need at least 2 tokens, got seq_len {self.ids.shape[1]}")
        vocab = int(student.config.vocab_size)
        if int(self.ids.min()) < 0 or int(self.ids.max()) >= vocab:
            raise InputError(f"distillation token ids must lie in [0, {vocab}) (the student's vocabulary)")

    def _settings(self, teacher_counts: list[int | None]) -> TrainingSettings:
        """What is trained against what: the target, the parts and the layers (module docs)."""
        o = self.options
        pruned = [layer for layer, indices in self.kept.items() if len(indices) < teacher_counts[layer]]
        target = o.target if o.target != "auto" else ("blocks" if pruned else "experts")
        train = o.train if o.train != "auto" else ("router+experts" if target == "blocks" else "experts")
        layers = pruned if target == "blocks" and pruned else sorted(self.kept)
        return TrainingSettings(
            o.steps, float(o.lr), float(o.lam), o.batch_size, o.checkpoint_every, o.seed,
            target=target, train=tuple(train.split("+")), layers=tuple(layers),
        )  # fmt: skip

    def calibration_samples(self, windows: int) -> int:
        return max(1, min(windows, self.options.steps * self.options.batch_size))

    def inputs(self) -> dict:
        return {"student model": self.lazy.model_dir, "teacher": self.teacher.model_dir, "training data": self.options.calib}

    def calibrate(self) -> None:
        o = self.options
        if not o.resume:
            shutil.rmtree(self.state_dir, ignore_errors=True)  # --overwrite: start over (under the claim)
        fingerprint = {
            "student": str(self.lazy.model_dir.resolve()),
            "teacher": str(self.teacher.model_dir.resolve()),
            "lr": o.lr,
            "lambda": o.lam,
            "batch_size": o.batch_size,
            "seed": o.seed,
            "data": hashlib.sha256(self.ids.contiguous().numpy().tobytes()).hexdigest(),
            "target": self.settings.target,
            "train": list(self.settings.train),
            "layers": list(self.settings.layers),
        }  # what must match for a checkpoint to be resumed (steps may grow, so it is not here)
        self.trained = train_student(
            self.lazy, self.teacher, self.kept, self.ids, self.settings,
            state_path=self.state_dir / STATE_FILE, fingerprint=fingerprint, resume=o.resume,
        )  # fmt: skip

    def transform_layer(self, index: int, layer: nn.Module) -> None:
        if index in self.settings.layers:
            adapter = self.lazy.adapter
            trained = trainable_parts(adapter, adapter.moe_block(adapter.decoder_layers(self.trained.model)[index]))
            parts = trainable_parts(adapter, adapter.moe_block(layer))
            for part in self.settings.train:
                parts[part].load_state_dict(trained[part].state_dict())

    @property
    def plot_title(self) -> str:
        return "distilled student: routed experts per layer"

    def report_sections(self) -> dict[str, Any]:
        o, history = self.options, self.trained.history
        return {
            "teacher": str(self.teacher.model_dir),
            "kept_experts": {str(k): v for k, v in self.kept.items()},
            "target": self.settings.target,
            "trained": {
                "parts": list(self.settings.train),
                "layers": list(self.settings.layers),
                "parameters": self.trained.parameters,
                "note": "exact zeros of expert matrices kept; everything else frozen",
            },
            "loss": f"CE + lambda * {TARGETS[self.settings.target].description}",
            "steps": o.steps,
            "lr": o.lr,
            "lambda": o.lam,
            "batch_size": o.batch_size,
            "data": self.calibration_summary(),
            "resumed_from_step": self.trained.resumed_from_step or None,
            "history": history,
            "first": history[0] if history else None,
            "last": history[-1] if history else None,
            "expert_weight_zeros": self.trained.zeros,
        }

    def finished(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)


def distill(options: DistillOptions) -> dict[str, Any]:
    """Distill ``options.model`` (the student) from ``options.teacher`` into ``options.out``."""
    return run_pipeline(DistillPipeline(options))
