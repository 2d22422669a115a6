"""What a distilled student is compared with: the teacher's experts, or the teacher's MoE blocks.

Both targets give the teacher's module the *student's* hidden state at that module's input, so
a term measures how far pruning moved one layer's function on the inputs that layer really
serves, and the teacher never runs as a model: only the modules a term needs are loaded from its
checkpoint (one layer at a time), frozen, in float32.

- :class:`ExpertTarget` (``"experts"``, for sparsified students): student expert i against the
  teacher expert it came from (``kept_experts``), on the tokens the student's router sends to
  it. Sparsification keeps every expert, so expert i still has a teacher counterpart.
- :class:`BlockTarget` (``"blocks"``, for expert-pruned students): the student's whole MoE block
  (router, routed experts, shared experts) against the teacher's unpruned block, on every
  token. After dropping or merging, a student expert no longer has one teacher expert whose
  function it should compute (a merged expert stands for a group, a substitute takes over a
  dropped expert's tokens, and the router picks among different experts), but the block's
  output is what the rest of the model reads, and it is defined on both sides.

Each term is the mean squared error over the tokens and hidden dimensions, summed over layers
(the loss adds ``lambda`` times the sum).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import nn

from grape.errors import InputError
from grape.model_io import LazyCausalLM
from grape_kernels.experts_module import expert_forward
from grape_kernels.ragged_modeling import select_experts

__all__ = ["TARGETS", "DistillTarget", "ExpertTarget", "BlockTarget", "make_target"]


class DistillTarget(ABC):
    """One kind of distillation term: loads the teacher's modules, hooks the student's."""

    name: str
    description: str

    def __init__(self, teacher: LazyCausalLM, kept: Mapping[int, list[int]], layers: list[int]) -> None:
        self.adapter = teacher.adapter
        self.kept = kept
        self.layers = layers
        self.teacher = teacher

    def install(self, model: nn.Module, terms: list[torch.Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
        """Hook the student's modules of :attr:`layers`; every forward appends its terms to ``terms``."""
        handles = []
        for layer in self.layers:
            block = self.adapter.moe_block(self.adapter.decoder_layers(model)[layer])
            handles.append(self._hook(layer, block, self._teacher_module(layer, block), terms))
        return handles

    def _load(self, layer: int, name: str) -> nn.Module:
        """A frozen float32 copy of the teacher's module ``name`` of the MoE block of ``layer``."""
        block = self.adapter.moe_block(self.adapter.decoder_layers(self.teacher.model)[layer])
        source = block if not name else getattr(block, name)
        prefix = f"{self.teacher.layer_prefix(layer)}.{self.adapter.block_attr}" + (f".{name}" if name else "")
        self.teacher.materialize(source, prefix)
        try:
            module = copy.deepcopy(source)
        finally:
            self.teacher.release(source)
        for param in module.parameters():
            param.requires_grad_(False)
        return module.float().eval()

    @abstractmethod
    def _teacher_module(self, layer: int, student_block: nn.Module) -> nn.Module: ...

    @abstractmethod
    def _hook(self, layer: int, block: nn.Module, teacher: nn.Module, terms: list[torch.Tensor]):
        """Register the forward hook that appends this layer's terms; returns its handle."""


class ExpertTarget(DistillTarget):
    name = "experts"
    description = (
        "sum over layers and experts of MSE(teacher expert it came from, student expert) on student-routed tokens"
    )

    def _teacher_module(self, layer: int, student_block: nn.Module) -> nn.Module:
        experts = self._load(layer, "experts")
        select_experts((experts,), torch.tensor(self.kept[layer]), len(self.kept[layer]))
        for name, param in experts.named_parameters():
            mine = getattr(student_block.experts, name)
            if param.shape != mine.shape:
                raise InputError(
                    f"layer {layer} {name}: teacher experts {tuple(param.shape)} do not match the student's {tuple(mine.shape)}"
                )
        return experts

    def _hook(self, layer: int, block: nn.Module, teacher: nn.Module, terms: list[torch.Tensor]):
        def hook(experts: nn.Module, args: tuple, _output) -> None:
            hidden, ids = args[0].detach(), args[1]
            for expert in range(int(experts.num_experts)):
                token_idx = torch.where(ids == expert)[0]
                if token_idx.numel() == 0:
                    continue
                x = hidden[token_idx]
                with torch.no_grad():
                    target = expert_forward(teacher, expert, x)
                terms.append(nn.functional.mse_loss(expert_forward(experts, expert, x), target))

        return block.experts.register_forward_hook(hook)


class BlockTarget(DistillTarget):
    name = "blocks"
    description = "sum over the trained layers of MSE(teacher's unpruned MoE block, student's MoE block) on every token"

    def _teacher_module(self, layer: int, student_block: nn.Module) -> nn.Module:
        return self._load(layer, "")

    def _hook(self, layer: int, block: nn.Module, teacher: nn.Module, terms: list[torch.Tensor]):
        def hook(_block: nn.Module, args: tuple, output) -> None:
            with torch.no_grad():
                target = _hidden(teacher(args[0].detach()))
            terms.append(nn.functional.mse_loss(_hidden(output), target))

        return block.register_forward_hook(hook)


def _hidden(output) -> torch.Tensor:
    """A MoE block's output hidden states (GPT-OSS's block also returns its router scores)."""
    return output[0] if isinstance(output, tuple) else output


TARGETS: dict[str, type[DistillTarget]] = {target.name: target for target in (ExpertTarget, BlockTarget)}


def make_target(name: str, teacher: LazyCausalLM, kept: Mapping[int, list[int]], layers: list[int]) -> DistillTarget:
    return TARGETS[name](teacher, kept, layers)
