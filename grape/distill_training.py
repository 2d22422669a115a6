"""The expert-wise distillation training loop (the ``calibrate`` stage of ``grape distill``).

loss = CE(student next-token logits) + lambda * sum over MoE layers l and student experts i of
MSE(teacher expert orig(l, i) (x), student expert i (x)) over the tokens x the *student's*
router sends to expert i; see :mod:`grape.distill` for the choices and why.

Batches are a deterministic function of (seed, step) and the RNG is re-seeded every step, so a
run resumed from its saved state (:mod:`grape.training_state`, every ``checkpoint_every`` steps
and after the last) continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from grape.checkpoint import load_pruned
from grape.errors import InputError
from grape.model_io import LazyCausalLM
from grape.training_state import load_training_state, save_training_state
from grape_kernels.experts_module import expert_forward
from grape_kernels.ragged_modeling import select_experts

__all__ = ["TrainingSettings", "TrainedExperts", "train_experts"]

_MASKED = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class TrainingSettings:
    steps: int
    lr: float
    lam: float
    batch_size: int
    checkpoint_every: int
    seed: int


@dataclass
class TrainedExperts:
    """What training produced: the trained student (float32, in memory) and its record."""

    model: nn.Module
    history: list[dict]
    resumed_from_step: int
    zeros: dict[str, int]


def _batch(data_ids: torch.Tensor, step: int, settings: TrainingSettings) -> torch.Tensor:
    """The batch of ``step``: epochs are seeded permutations of the rows, last partial batch dropped."""
    per_epoch = max(1, data_ids.shape[0] // settings.batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(data_ids.shape[0], generator=torch.Generator().manual_seed(settings.seed + epoch))
    return data_ids[order[position * settings.batch_size : (position + 1) * settings.batch_size]]


def _teacher_experts(teacher: LazyCausalLM, kept: dict[int, list[int]], model: nn.Module) -> dict[int, nn.Module]:
    """Per MoE layer, a frozen experts module holding the teacher's kept experts in student order."""
    adapter = teacher.adapter
    teachers = {}
    for layer_index, indices in kept.items():
        student_experts = adapter.moe_block(adapter.decoder_layers(model)[layer_index]).experts
        source = adapter.moe_block(adapter.decoder_layers(teacher.model)[layer_index]).experts
        teacher.materialize(source, f"{teacher.layer_prefix(layer_index)}.{adapter.block_attr}.experts")
        try:
            experts = copy.deepcopy(source)
        finally:
            teacher.release(source)
        select_experts((experts,), torch.tensor(indices), len(indices))
        for name, param in experts.named_parameters():
            if param.shape != getattr(student_experts, name).shape:
                raise InputError(
                    f"layer {layer_index} {name}: teacher experts {tuple(param.shape)} do not match "
                    f"the student's {tuple(getattr(student_experts, name).shape)}"
                )
            param.requires_grad_(False)
        teachers[layer_index] = experts.float().eval()
    return teachers


def _trainable_experts(model: nn.Module, blocks: dict[int, nn.Module]) -> tuple[dict[str, nn.Parameter], dict[str, torch.Tensor]]:
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


def train_experts(
    student: LazyCausalLM,
    teacher: LazyCausalLM,
    kept: dict[int, list[int]],
    data_ids: torch.Tensor,
    settings: TrainingSettings,
    *,
    state_path: Path,
    fingerprint: dict,
    resume: bool,
) -> TrainedExperts:
    """Train the student's routed experts on ``data_ids``, saving resumable state to ``state_path``."""
    model = load_pruned(student.model_dir, dtype=torch.float32)
    blocks = {i: student.adapter.moe_block(student.adapter.decoder_layers(model)[i]) for i in kept}
    trainable, masks = _trainable_experts(model, blocks)
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
    teachers = _teacher_experts(teacher, kept, model)
    kd_terms: list[torch.Tensor] = []
    handles = [blocks[i].experts.register_forward_hook(_expert_mse_hook(teachers[i], kd_terms)) for i in blocks]
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
            loss = ce + settings.lam * kd
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
    return TrainedExperts(model, history, start, zeros)
