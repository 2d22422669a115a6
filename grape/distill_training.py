"""The distillation training loop (the ``calibrate`` stage of ``grape distill``).

loss = CE(student next-token logits) + lambda * (the target's terms, :mod:`grape.distill_targets`),
training only the chosen parts (routers, routed experts) of the chosen layers; see
:mod:`grape.distill` for the choices and why.

Batches are a deterministic function of (seed, step) and the RNG is re-seeded every step, so a
run resumed from its saved state (:mod:`grape.training_state`, every ``checkpoint_every`` steps
and after the last) continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from grape.checkpoint import load_pruned
from grape.distill_targets import make_target
from grape.errors import InputError
from grape.model_io import LazyCausalLM
from grape.training_state import load_training_state, save_training_state

__all__ = ["TrainingSettings", "TrainedStudent", "train_student", "trainable_parts"]

_MASKED = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class TrainingSettings:
    """The loop's numbers, and what it trains against what.

    Attributes:
        target: a :data:`grape.distill_targets.TARGETS` name.
        train: the parts trained in each of ``layers``: ``"router"`` and/or ``"experts"``.
        layers: the MoE layers trained (and compared with the teacher).
    """

    steps: int
    lr: float
    lam: float
    batch_size: int
    checkpoint_every: int
    seed: int
    target: str = "experts"
    train: tuple[str, ...] = ("experts",)
    layers: tuple[int, ...] = ()


@dataclass
class TrainedStudent:
    """What training produced: the trained student (float32, in memory) and its record."""

    model: nn.Module
    history: list[dict]
    resumed_from_step: int
    zeros: dict[str, int]
    parameters: int


def _batch(data_ids: torch.Tensor, step: int, settings: TrainingSettings) -> torch.Tensor:
    """The batch of ``step``: epochs are seeded permutations of the rows, last partial batch dropped."""
    per_epoch = max(1, data_ids.shape[0] // settings.batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(data_ids.shape[0], generator=torch.Generator().manual_seed(settings.seed + epoch))
    return data_ids[order[position * settings.batch_size : (position + 1) * settings.batch_size]]


def trainable_parts(adapter, block: nn.Module) -> dict[str, nn.Module]:
    """The parts of a MoE block distillation can train, by the names ``train`` uses."""
    return {"router": adapter.router(block), "experts": block.experts}


def _trainable(
    model: nn.Module, adapter, settings: TrainingSettings
) -> tuple[dict[str, nn.Parameter], dict[str, torch.Tensor]]:
    """Freeze everything but the chosen parts of the chosen layers; the masks of their expert matrices.

    Returns the trainable parameters keyed ``"<layer>.<module>.<name>"`` and, for the experts'
    gate_up_proj and down_proj, the keep-masks (their non-zeros now): exact zeros (a sparsified
    student's pruned weights) stay zero. A gradient hook zeroes the gradient of every pruned
    weight, so the optimizer never sees a reason to move it.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    trainable: dict[str, nn.Parameter] = {}
    masks: dict[str, torch.Tensor] = {}
    for layer in settings.layers:
        block = adapter.moe_block(adapter.decoder_layers(model)[layer])
        modules = trainable_parts(adapter, block)
        for part in settings.train:
            for name, param in modules[part].named_parameters():
                key = f"{layer}.{part}.{name}"
                param.requires_grad_(True)
                trainable[key] = param
                if part == "experts" and name in _MASKED:
                    masks[key] = param.detach() != 0
                    param.register_hook(lambda grad, keep=masks[key]: grad * keep)
    return trainable, masks


def _resumed_state(path: Path, fingerprint: dict, steps: int) -> tuple[dict, dict, dict]:
    """The saved (trainable, optimizer, extra), checked against this run's settings."""
    trainable, optimizer, extra = load_training_state(path)
    differing = [k for k, v in fingerprint.items() if extra.get("fingerprint", {}).get(k) != v]
    if differing:
        raise InputError(
            f"cannot resume from {path}: it was made with different {', '.join(differing)}; "
            "rerun with the original settings or delete the checkpoint"
        )
    if int(extra["step"]) > steps:
        raise InputError(f"the checkpoint {path} is at step {extra['step']}, beyond --steps {steps}")
    return trainable, optimizer, extra


def train_student(
    student: LazyCausalLM,
    teacher: LazyCausalLM,
    kept: dict[int, list[int]],
    data_ids: torch.Tensor,
    settings: TrainingSettings,
    *,
    state_path: Path,
    fingerprint: dict,
    resume: bool,
) -> TrainedStudent:
    """Train the student on ``data_ids`` as ``settings`` say, saving resumable state to ``state_path``."""
    model = load_pruned(student.model_dir, dtype=torch.float32)
    trainable, masks = _trainable(model, student.adapter, settings)
    optimizer = torch.optim.AdamW(trainable.values(), lr=settings.lr, weight_decay=0.0)
    history: list[dict] = []
    start = 0
    if resume:
        saved, optimizer_state, extra = _resumed_state(state_path, fingerprint, settings.steps)
        with torch.no_grad():
            for key, value in saved.items():
                trainable[key].copy_(value)
        optimizer.load_state_dict(optimizer_state)
        history, start = extra["history"], int(extra["step"])
    kd_terms: list[torch.Tensor] = []
    handles = make_target(settings.target, teacher, kept, list(settings.layers)).install(model, kd_terms)
    model.train()
    progress = tqdm(total=settings.steps, initial=start, desc="distill", unit="step")
    try:
        for step in range(start, settings.steps):
            torch.manual_seed(settings.seed + step)
            batch = _batch(data_ids, step, settings)
            kd_terms.clear()
            logits = model(input_ids=batch, use_cache=False).logits
            ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
            kd = torch.stack(kd_terms).sum() if kd_terms else ce.new_zeros(())
            loss = ce + settings.lam * kd if settings.lam else ce
            if not torch.isfinite(loss):
                raise InputError(f"distillation loss became {loss.item()} at step {step + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for key, keep in masks.items():
                    trainable[key].masked_fill_(~keep, 0)
            history.append({"step": step + 1, "ce": ce.item(), "kd": kd.item(), "loss": loss.item()})
            progress.update(1)
            progress.set_postfix(ce=f"{ce.item():.3f}", kd=f"{kd.item():.4g}")
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                save_training_state(
                    state_path,
                    trainable=trainable,
                    optimizer=optimizer.state_dict(),
                    extra={"step": step + 1, "history": history, "fingerprint": fingerprint},
                )
    finally:
        progress.close()
        for handle in handles:
            handle.remove()
    zeros = {
        "masked": sum(int((~keep).sum()) for keep in masks.values()),
        "after": sum(int((trainable[key] == 0).sum()) for key in masks),
    }
    return TrainedStudent(model, history, start, zeros, sum(p.numel() for p in trainable.values()))
